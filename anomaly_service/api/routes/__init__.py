"""The API's routes, one router per area: scoring, models, operations."""
