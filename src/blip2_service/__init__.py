"""blip2-service: BLIP-2 / BLIP image captions with emojis, over HTTP, watched folders and RabbitMQ."""

__version__ = "0.1.0"
