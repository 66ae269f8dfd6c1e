"""EDM preconditioning (Karras et al. 2022, Table 1) around any backbone, with Patch
Diffusion's coordinate channels concatenated after the c_in scaling (Wang et al. 2023).

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F([c_in(sigma) x, pos]; c_noise(sigma))

The backbone ``F`` is any module called as ``F(x_in, noise_labels, class_labels)``
whose input has image_channels + 2 channels and whose output has image_channels.
"""

from __future__ import annotations

import torch
from torch import nn

from .patches import coordinate_grid


class EDMPrecond(nn.Module):
    """The denoiser D(x; sigma, pos) of EDM with Patch Diffusion's position input."""

    def __init__(self, backbone: nn.Module, image_channels: int, sigma_data: float = 0.5,
                 label_dim: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.image_channels = image_channels
        self.sigma_data = sigma_data
        self.label_dim = label_dim

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) for each sigma, EDM Table 1."""
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoise ``x`` [B, C, h, w] at noise level ``sigma`` ([B] or scalar).

        ``pos`` [B, 2, h, w] gives each pixel's canvas coordinates; without it ``x``
        is taken to be the whole canvas and gets the full [-1, 1] grid.
        """
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(batch) if sigma.numel() == 1 else sigma
        if pos is None:
            pos = coordinate_grid(x.shape[2], x.shape[3], device=x.device).expand(batch, -1, -1, -1)
        if self.label_dim and class_labels is None:
            class_labels = torch.zeros(batch, self.label_dim, device=x.device)
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in self.scalings(sigma))
        x32 = x.to(torch.float32)
        net_in = torch.cat([c_in * x32, pos.to(torch.float32)], dim=1)
        f = self.backbone(net_in, c_noise.flatten(), class_labels)
        return c_skip * x32 + c_out * f.to(torch.float32)
