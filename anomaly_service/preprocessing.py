"""Image -> normalised tensor at the network's working resolution, keeping the whole frame.

There is deliberately no centre crop: a defect at the border must reach the model. The aspect ratio is kept
(the longer side becomes ``image_size``) and each side is rounded to a multiple of the backbone's stride so
the two feature grids align exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocessing:
    image_size: int  # target length of the longer side, in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stride: int

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the network sees for an image of the given size."""
        scale = self.image_size / max(height, width)
        def snap(side: int) -> int:
            return max(self.stride * 2, int(round(side * scale / self.stride)) * self.stride)
        return snap(height), snap(width)

    def to_tensor(self, image: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``(H, W, 3)`` uint8 -> ``(3, h, w)`` float32, resized with antialiasing and normalised."""
        h, w = size or self.working_size(image.shape[0], image.shape[1])
        x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=not image.flags.writeable, order='C')).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).squeeze(0)

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std), "stride": self.stride,
                "resize": "longer-side, aspect kept, sides rounded to stride, bilinear antialiased", "crop": "none"}
