"""Counters of the data pipeline: documents, drops by reason, packing efficiency, tiles per row."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoaderStats:
    read: int = 0  # raw samples read from the source
    samples: int = 0  # documents that reached a batch
    batches: int = 0
    rows: int = 0
    tokens: int = 0  # non-pad tokens in rows
    capacity: int = 0  # token slots of those rows: rows x max_tokens_per_row when packed, rows x longest when not
    tiles: int = 0
    supervised: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> samples skipped
    events: Counter = field(default_factory=Counter)  # conversions that kept the sample (truncated, ...)

    @property
    def packing_efficiency(self) -> float:
        """Non-pad tokens / row capacity."""
        return self.tokens / self.capacity if self.capacity else 0.0

    @property
    def tiles_per_row(self) -> float:
        return self.tiles / self.rows if self.rows else 0.0

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def merge(self, other: LoaderStats) -> None:
        for name in ("read", "samples", "batches", "rows", "tokens", "capacity", "tiles", "supervised"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.dropped.update(other.dropped)
        self.events.update(other.events)

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "samples": self.samples,
            "batches": self.batches,
            "rows": self.rows,
            "tokens": self.tokens,
            "capacity": self.capacity,
            "tiles": self.tiles,
            "supervised": self.supervised,
            "dropped": dict(self.dropped),
            "events": dict(self.events),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoaderStats:
        plain = {k: v for k, v in data.items() if k not in ("dropped", "events")}
        return cls(**plain, dropped=Counter(data.get("dropped", {})), events=Counter(data.get("events", {})))
