"""``FSMoEConfig``: the backend's options, validated with errors that name the bad value.

``torch.compile(model, backend="fsmoe", options={...})`` hands ``options`` to the
backend; ``FSMoEConfig.from_options`` turns it into this dataclass or raises a
``ValueError`` naming the unknown key or bad value and the valid choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class FSMoEConfig:
    """Options of the fsmoe backend.

    strict: raise instead of falling back to the unmodified graph when a pass
        cannot apply or a region is only partly understood.
    check_ranks: when torch.distributed is initialised with more than one rank,
        compare the regions every rank found and raise if they differ (ranks
        that disagree would otherwise issue collectives in different orders).
    dump_dir: if set, write each graph's code before and after the passes there.
    """

    strict: bool = False
    check_ranks: bool = True
    dump_dir: str | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "FSMoEConfig" | None) -> "FSMoEConfig":
        """Validate ``options`` (a mapping, a config, or None) into a config."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(
                f"fsmoe options must be a dict or FSMoEConfig, got {type(options).__name__}"
            )
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                raise ValueError(
                    f"unknown fsmoe option {key!r}; valid options are: {', '.join(valid)}"
                )
        config = cls(**dict(options))
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError for a value of the wrong kind."""
        for name in ("strict", "check_ranks"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"fsmoe option {name!r} must be True or False, got {value!r}")
        if self.dump_dir is not None and not isinstance(self.dump_dir, str):
            raise ValueError(
                f"fsmoe option 'dump_dir' must be a directory path (str) or None, got {self.dump_dir!r}"
            )

    def __post_init__(self) -> None:
        self.validate()
