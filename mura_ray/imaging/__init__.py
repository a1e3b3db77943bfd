"""Image bytes -> 8-bit gray -> cached square -> model input. No Ray."""
