"""Training metrics kept on the device and read back once per logging interval."""

from __future__ import annotations

from typing import Any

import torch


class MetricWindow:
    """Means of the metrics over a logging interval. Tensor values are summed on their device and read
    back once, in :meth:`means` (one device-to-host copy per interval instead of one per metric and
    step). A NaN tensor value means "not measured in this batch" (e.g. an accuracy over no position)
    and is left out of its mean; a metric never measured in the interval is logged as null."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, Any] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float().reshape(())
                seen = ~torch.isnan(v)
                v, n = torch.where(seen, v, torch.zeros_like(v)), seen.float()
            else:
                v, n = float(v), 1
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts[k] + n if k in self.counts else n

    def means(self) -> dict[str, float]:
        keys = [k for k, v in self.sums.items() if isinstance(v, torch.Tensor) or isinstance(self.counts[k], torch.Tensor)]
        out = {k: v / self.counts[k] for k, v in self.sums.items() if k not in keys}
        if keys:
            device = next(v.device for v in (*self.sums.values(), *self.counts.values()) if isinstance(v, torch.Tensor))
            pairs = torch.stack([torch.as_tensor(x, dtype=torch.float32, device=device).reshape(())
                                 for k in keys for x in (self.sums[k], self.counts[k])]).cpu().tolist()
            out.update({k: pairs[2 * j] / pairs[2 * j + 1] if pairs[2 * j + 1] else float("nan")
                        for j, k in enumerate(keys)})
        return out
