"""The HTTP service: a thin FastAPI shell over the models, the registry and the micro-batcher.

``create_app(settings)`` (api/app.py) builds the app. The rest: ``lifecycle`` (the Service and its lifespan),
``admission`` (budgets on the work in flight), ``clients`` (noticing a client that left), ``deps`` (route
dependencies), ``errors`` (the one error shape), ``middleware``, ``schemas`` (the JSON shapes), ``server`` (how
``anomaly serve`` runs uvicorn: connection limits and timeouts) and ``routes/``. ``create_app`` is imported on
first use, so ``api.schemas`` alone does not load the web stack.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
