"""DDP around MARIS through torch.distributed (NCCL on CUDA, gloo on CPU), for a one-GPU machine under torchrun.

train.py joins a process group only when WORLD_SIZE > 1, so `torchrun --nproc_per_node 1 train.py` runs its
single-process path and a one-GPU machine cannot check NCCL through it (NCCL refuses two ranks on one GPU).
This script joins the group whatever the world size, wraps a tiny MARIS in DistributedDataParallel as
train.py does (through `maris.TrainStep` where the project has it), runs three bf16 (CUDA) training steps
and an all_reduce, and prints one line:

    torchrun --standalone --nproc_per_node 1 bench/ddp_check.py
"""
import os
import pathlib
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import maris  # noqa: E402


def main() -> None:
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("error: run under torchrun: torchrun --standalone --nproc_per_node 1 bench/ddp_check.py")
    cuda = torch.cuda.is_available()
    local = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = maris.build_maris(maris.make_config("tiny", image_size=64)).to(device)
    # The module train.py wraps: maris.TrainStep (the model and its training loss) where the project has
    # one, else MARIS itself.
    step = maris.TrainStep(model) if hasattr(maris, "TrainStep") else model
    ddp = torch.nn.parallel.DistributedDataParallel(step, device_ids=[local] if cuda else None,
                                                    broadcast_buffers=False, find_unused_parameters=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    images = torch.randn(2, 3, 64, 64, generator=g).to(device)
    ids, word_mask = data.tokenize(["the red box on the left", "the dog"], model.cfg.context_length)
    masks = (torch.rand(2, 64, 64, generator=g) > 0.5).float().to(device)
    losses = []
    for _ in range(3):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            if step is model:
                logits = ddp(images, ids.to(device), word_mask.to(device))  # (B, 1, 4H, 4W)
                loss = maris.segmentation_loss(logits.float(), masks, None, model.cfg)["loss"]
            else:
                loss = ddp(ids=ids.to(device), word_mask=word_mask.to(device), masks=masks, valid=None,
                           images=images)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    total = torch.full((1,), float(rank + 1), device=device)
    dist.all_reduce(total)
    ok = all(map(torch.isfinite, map(torch.tensor, losses))) and total.item() == world * (world + 1) / 2
    print(f"rank {rank}/{world} {dist.get_backend()} on {device}: DDP losses {[round(x, 4) for x in losses]}, "
          f"all_reduce {total.item():.0f}: {'ok' if ok else 'FAILED'}")
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
