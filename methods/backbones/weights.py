"""Loading pretrained backbone weights from local files only (the harness never downloads anything).

``pretrained`` is ``False`` (random init), ``"imagenet"`` / ``True`` (the standard ImageNet file, looked up
in torch.hub's checkpoint cache, where ``torch.hub.load_state_dict_from_url`` would have put it) or a path
to a state-dict file. A file may hold the backbone's *native* keys (torchvision's, Cadene's
``pretrainedmodels``) or the harness's own ``StagedBackbone.state_dict()`` keys (``stages.<stage>...``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import ConfigError
from harness.model import StagedBackbone

IMAGENET = "imagenet"


@dataclass(frozen=True)
class WeightsFile:
    """Where the ImageNet weights of a backbone come from: the file name expected in the torch.hub
    checkpoint cache and the URL it is published at (for the error message only)."""

    filename: str
    url: str


def hub_checkpoint_dir() -> Path:
    """torch.hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``, ``~/.cache/torch/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_path(pretrained: str | bool, imagenet: WeightsFile, backbone: str) -> Path | None:
    """The file ``pretrained`` names, or None for random init; ConfigError when the file is absent."""
    if pretrained is False:
        return None
    if pretrained is True or pretrained == IMAGENET:
        path = hub_checkpoint_dir() / imagenet.filename
        if not path.is_file():
            raise ConfigError(
                f"backbone.pretrained: the ImageNet weights of {backbone} are not in the local cache: put "
                f"{imagenet.filename} (from {imagenet.url}) into {path.parent}/ "
                "(torch.hub.get_dir()/checkpoints; set TORCH_HOME to use another directory), or give "
                "backbone.pretrained the path of a weights file, or set backbone.pretrained=false. "
                "The harness never downloads weights."
            )
        return path
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"backbone.pretrained: weights file {str(path)!r} of {backbone} does not exist (expected a state "
            f"dict saved with torch.save, e.g. {imagenet.filename} from {imagenet.url}; or use 'imagenet' or "
            "false)"
        )
    return path


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types; all mean "not a state dict file"
        raise ConfigError(f"backbone.pretrained: cannot read {str(path)!r} as a state dict: {e}") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"backbone.pretrained: {str(path)!r} is not a state dict (names → tensors)")
    return state


def _fit(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """``value`` shaped like ``target``; Caffe ports store BN vectors as [1, C] (BN-Inception)."""
    if value.shape == target.shape:
        return value
    if value.dim() == target.dim() + 1 and value.shape[0] == 1 and value.shape[1:] == target.shape:
        return value.squeeze(0)
    return None


def load_pretrained(
    backbone: StagedBackbone,
    pretrained: str | bool,
    imagenet: WeightsFile,
    native_prefix: Mapping[str, str],
) -> None:
    """Load the weights ``pretrained`` names into ``backbone`` (no-op for False).

    ``native_prefix[stage]`` is what the native key of a parameter of ``stage`` starts with, e.g. googlenet's
    ``pool1`` stage holds torchvision's ``maxpool1.``; the rest of the key is the same. Every parameter and
    buffer of the backbone must be found (``num_batches_tracked`` may be missing), extra keys (classifier)
    are ignored.
    """
    name = type(backbone).__name__
    path = weights_path(pretrained, imagenet, name)
    if path is None:
        return
    state = _read_state_dict(path)
    own = backbone.state_dict()
    native = not any(k in state for k in own)
    missing, mismatched, target = [], [], {}
    for key, tensor in own.items():
        stage, rest = key.removeprefix("stages.").split(".", 1)
        source = native_prefix[stage] + rest if native else key
        if source not in state:
            if not key.endswith("num_batches_tracked"):
                missing.append(source)
            continue
        value = _fit(state[source], tensor)
        if value is None:
            mismatched.append(f"{source} {tuple(state[source].shape)} (expected {tuple(tensor.shape)})")
        else:
            target[key] = value
    if missing or mismatched:
        problems = [f"missing {k}" for k in missing[:5]] + [f"shape of {m}" for m in mismatched[:5]]
        more = len(missing) + len(mismatched) - len(problems)
        raise ConfigError(
            f"backbone.pretrained: {str(path)!r} does not fit {name}: "
            + "; ".join(problems)
            + (f"; and {more} more" if more > 0 else "")
            + f" (expected the keys of {imagenet.filename} or of {name}.state_dict())"
        )
    backbone.load_state_dict(target, strict=False)
