"""Bottleneck adapters (Houlsby et al. 2019; seed 003's "BNAdapter") after each feed-forward block.

Seed 003 describes the additive PEFT family by its first member: a small module inserted
in every transformer block that projects down, applies a non-linearity and projects back
up, added to the block's output. Neither peft nor a library that supports transformers 5
offers it (AdapterHub's ``adapters`` pins its own transformers version), so it is written
here, small: each decoder layer's feed-forward module (``mlp``, ``feed_forward`` or
``ffn``) gets a child ``bottleneck`` and a forward hook

    h = mlp(x);  h + up(act(down(h)))      (up starts at zero: the model is unchanged at step 0)

The adapter weights live under ``...mlp.bottleneck.*``, so the base keys are untouched.
A run saves only those weights (``bottleneck_adapter.safetensors`` + ``bottleneck_config.json``);
loading a run folder re-attaches them over the base model named in its ``config.yaml``.
The non-linearity means they cannot be merged into the base weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import TunelabError

CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck_adapter.safetensors"
FEED_FORWARD_NAMES = ("mlp", "feed_forward", "ffn")


class Bottleneck(nn.Module):
    """``h + up(act(down(h)))`` with ``up`` initialised to zero."""

    def __init__(self, hidden: int, size: int, activation: str = "relu"):
        super().__init__()
        from transformers.activations import ACT2FN

        if activation not in ACT2FN:
            raise TunelabError(f"method.adapter_activation: {activation!r} is not an activation transformers knows")
        self.down = nn.Linear(hidden, size)
        self.act = ACT2FN[activation]
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.act(self.down(hidden.to(self.down.weight.dtype)))).to(hidden.dtype)


def _hook(module: nn.Module, args, output):
    return module.bottleneck(output)


def _feed_forwards(model: nn.Module) -> list[nn.Module]:
    """The feed-forward module of every decoder layer (the classes transformers won't split)."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise TunelabError(f"method.name: bottleneck: cannot find the decoder layers of {type(model).__name__}")
    blocks = []
    for layer in layers:
        ff = next((getattr(layer, n) for n in FEED_FORWARD_NAMES if isinstance(getattr(layer, n, None), nn.Module)),
                  None)
        if ff is None:
            raise TunelabError(f"method.name: bottleneck: no feed-forward module ({', '.join(FEED_FORWARD_NAMES)}) "
                               f"in {type(layer).__name__}")
        blocks.append(ff)
    return blocks


def has_adapters(model: nn.Module) -> bool:
    return bool(getattr(model, "tunelab_bottleneck", None))


def add_adapters(model: nn.Module, size: int, activation: str = "relu") -> nn.Module:
    """Attach one bottleneck (``hidden -> size -> hidden``) after every feed-forward block."""
    if has_adapters(model):
        return model
    hidden = model.config.hidden_size
    param = next(model.parameters())
    for ff in _feed_forwards(model):
        ff.bottleneck = Bottleneck(hidden, size, activation).to(device=param.device, dtype=torch.float32)
        ff.register_forward_hook(_hook)
    model.tunelab_bottleneck = {"size": size, "activation": activation, "hidden_size": hidden}
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".bottleneck." in k}


def save_adapters(model: nn.Module, folder: Path) -> None:
    """Write only the adapter weights and their shape; drop the full weights the trainer saved."""
    from safetensors.torch import save_file

    from tunelab.io import atomic_write_text

    folder = Path(folder)
    save_file(adapter_state(model), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    atomic_write_text(folder / CONFIG_FILE, json.dumps(model.tunelab_bottleneck, indent=1))
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (folder / name).unlink(missing_ok=True)


def load_adapters(model: nn.Module, folder: Path, trainable: bool = False) -> nn.Module:
    """Re-attach the adapters saved in ``folder`` to the base ``model``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        shape = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        state = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise TunelabError(f"{folder}: cannot read the bottleneck adapters: {exc}") from exc
    add_adapters(model, int(shape["size"]), shape.get("activation", "relu"))
    missing = set(adapter_state(model)) - set(state)
    if missing:
        raise TunelabError(f"{folder / WEIGHTS_FILE}: missing {sorted(missing)[0]} (a different model?)")
    model.load_state_dict(state, strict=False)
    for name, param in model.named_parameters():
        param.requires_grad_(trainable and ".bottleneck." in name)
    return model
