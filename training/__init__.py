"""Training side of pel-moderation: dataset adapters, face-crop preparation, self-blended
forgeries, Ray Train training, calibration and evaluation (`pel prepare|train|calibrate|evaluate`)."""
