"""What every adapter offers the trainer, whatever library implements it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainingError
from .files import write_adapter_file


class Adapter:
    """An adapter attached to a frozen transformer.

    `state_dict()` is the raw training state (exact tensors the optimizer updates; used for
    checkpoints and bit-exact resume). `file_tensors()` is the exported layout that ComfyUI and
    diffusers load. Subclasses set `kind`, `config`, `wrapped_module_names` and implement the rest.
    """

    kind: str = ""
    config: dict[str, Any]
    wrapped_module_names: list[str]

    def parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.named_parameters().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.named_parameters()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise TrainingError(
                f"{self.kind} adapter state does not fit this model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}. Was it saved with another adapter config?"
            )
        with torch.no_grad():
            for name, param in own.items():
                if param.shape != state[name].shape:
                    raise TrainingError(
                        f"{self.kind} adapter tensor '{name}' has shape {tuple(state[name].shape)}, "
                        f"expected {tuple(param.shape)}"
                    )
                param.copy_(state[name])

    def file_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def file_metadata(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write the final ComfyUI-loadable file; `metadata` adds run facts (see files.run_metadata)."""
        meta = {**(metadata or {}), **self.file_metadata()}
        return write_adapter_file(path, self.file_tensors(), meta)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Adapter:
        for p in self.parameters():
            p.data = p.data.to(device=device or p.device, dtype=dtype or p.dtype)
        return self

    def remove(self) -> None:
        """Detach from the transformer: it computes its base outputs again."""
        raise NotImplementedError

    def restore(self) -> None:
        """Re-attach after remove()."""
        raise NotImplementedError

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside, the transformer computes the base model's outputs (the parent prediction of
        regularisation batches); the adapter acts again after."""
        self.remove()
        try:
            yield
        finally:
            self.restore()
