"""One way to reach Redis: a single server or a Redis Cluster, plain, AUTH or TLS.

URLs: ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS; ``?ssl_cert_reqs=none``
or ``ssl_ca_certs=...`` as redis-py reads them) or ``unix:///path``. With `RedisConfig.cluster`
the URL names any node of the cluster and the client follows the slot map. Every key the
service uses starts with `RedisConfig.prefix`; on a cluster the prefix must be a hash tag such
as ``{pel}``, so a job's keys, the intake stream and the verdicts share one slot and each Lua
script touches a single slot (the config refuses anything else).
"""
from __future__ import annotations

from typing import Union
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.cluster import RedisCluster

from pel_model.config import RedisConfig

Client = Union[redis.Redis, RedisCluster]


def connect(url: str, cfg: RedisConfig, decode_responses: bool = False, **kwargs) -> Client:
    """A client for `url`: `RedisCluster` when `cfg.cluster`, else `redis.Redis`."""
    if cfg.cluster:  # database 0 is the only one; redis-py refuses an explicit "/0"
        parts = urlsplit(url)
        url = urlunsplit(parts._replace(path="")) if parts.path in ("/", "/0") else url
        return RedisCluster.from_url(url, decode_responses=decode_responses, **kwargs)
    return redis.Redis.from_url(url, decode_responses=decode_responses, **kwargs)


def bytes_twin(client: Client) -> Client:
    """`client` itself, or a twin that returns bytes if it decodes responses (payloads are
    hostile bytes: invalid UTF-8 must become a dead letter, not a UnicodeDecodeError)."""
    if isinstance(client, RedisCluster):
        kwargs = dict(client.nodes_manager.connection_kwargs)
        if not kwargs.get("decode_responses"):
            return client
        node = client.get_default_node()
        keep = {k: v for k, v in kwargs.items()
                if k not in ("host", "port", "decode_responses", "connection_pool")
                and not k.startswith(("maint_", "orig_", "himport"))}
        return RedisCluster(host=node.host, port=node.port, decode_responses=False, **keep)
    kwargs = client.connection_pool.connection_kwargs
    if not kwargs.get("decode_responses"):
        return client
    keep = {k: v for k, v in kwargs.items() if not k.startswith(("maint_", "orig_", "himport"))}
    pool = redis.ConnectionPool(connection_class=client.connection_pool.connection_class,
                                **{**keep, "decode_responses": False})
    return redis.Redis(connection_pool=pool)
