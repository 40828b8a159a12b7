"""metalearner: meta-learn online controllers of a transformer's RoPE base and
local-attention window with Ray Tune, traced in MLflow. See DESIGN.md for the contract."""

from metalearner.controllers import CONTROLLERS, Controller
from metalearner.knobs import Knobs
from metalearner.registry import build_controller

__version__ = "0.1.0"


def __getattr__(name: str):  # torch-dependent names load lazily: the controller layer has no torch
    if name in ("ModelConfig", "build_model"):
        from metalearner import model

        return getattr(model, name)
    raise AttributeError(f"module 'metalearner' has no attribute {name!r}")


__all__ = ["CONTROLLERS", "Controller", "Knobs", "ModelConfig", "build_controller", "build_model"]
