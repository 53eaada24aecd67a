"""pel-moderation service: Redis job intake, stream workers, verdicts and metrics."""
