"""Time one optimizer step of ResNet18's parameters: foreach vs fused AdamW (CPU unless CUDA)."""

import time

import torch
import torchvision

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
for fused in (False, True):
    model = torchvision.models.resnet18().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # warm-up (allocates the moments)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"AdamW fused={fused} on {device}: {(time.perf_counter() - start) / 5 * 1000:.1f} ms per step")
