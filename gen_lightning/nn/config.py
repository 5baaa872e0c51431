"""Network shape configs that travel through LightningCLI (as dataclasses) and checkpoints (as plain dicts)."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Self


class NetConfig:
    """Mixin for `@dataclass` network configs: `as_dict()` gives plain types for `save_hyperparameters` (checkpoints
    load weights-only), `coerce()` takes either form back; tuple fields come back as tuples."""

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def coerce(cls, value: Self | dict[str, Any]) -> Self:
        """Accept the dataclass (from the CLI) or a plain dict (from a weights-only checkpoint)."""
        if isinstance(value, cls):
            return value
        try:
            config = cls(**value)
        except TypeError as err:
            raise TypeError(f"bad {cls.__name__} {value!r}: {err}") from err
        for field in fields(config):  # type: ignore[arg-type]
            if str(field.type).startswith("tuple") and isinstance(getattr(config, field.name), list):
                setattr(config, field.name, tuple(getattr(config, field.name)))
        return config
