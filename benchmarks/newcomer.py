"""README's path as a new user runs it: a torchvision classifier trained by hand on an image folder, then compressed
with README's one command (docs/benchmarks.md, "Your model, your images").

Step 1 (this script) does what the user did before lm_plugin: it writes Fashion-MNIST as an ``ImageFolder`` of PNGs
(10 classes; train: the first 600 training images of each class, val: the next 100 of each class after the last
train image, test: the first 200 test images of each class) and trains ``torchvision.models.resnet18(num_classes=10)``
on it for 8 epochs the usual way (AdamW with OneCycle, ImageNet statistics, 32×32 RGB):

    python benchmarks/newcomer.py --out /tmp/newcomer

Step 2 is README's command, from a fresh clone with an empty cache (the numbers come from its ``report.md``):

    cd /tmp/newcomer && LM_PLUGIN_CACHE=/tmp/newcomer/cache lm-plugin compress \\
        --model torchvision:resnet18:num_classes=10 --checkpoint resnet18.pt --data imagefolder:my_images \\
        --input-shape 3,32,32 --budget 0.6 --output runs/resnet18

Writes ``OUT/my_images/``, ``OUT/resnet18.pt`` and ``OUT/training.json`` (test accuracy per epoch).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchvision
from torchvision import transforms
from torchvision.datasets import FashionMNIST, ImageFolder

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def write_folder(root: Path, data_root: Path) -> None:
    """The image folder: per class, train / val / test PNGs (val strictly after the last train image)."""
    train_set = FashionMNIST(str(data_root), train=True, download=False)
    test_set = FashionMNIST(str(data_root), train=False, download=False)

    def write(split: str, dataset: FashionMNIST, per_class: int, start: int) -> int:
        seen: dict[str, int] = {}
        last = start
        for i in range(start, len(dataset)):
            if len(seen) == 10 and min(seen.values()) >= per_class:
                break
            image, label = dataset[i]
            name = dataset.classes[label].replace("/", "-")
            if seen.get(name, 0) >= per_class:
                continue
            seen[name] = seen.get(name, 0) + 1
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.png")
            last = i
        return last

    last_train = write("train", train_set, 600, 0)
    write("val", train_set, 100, last_train + 1)
    write("test", test_set, 200, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data-root", type=Path, default=Path.home() / ".cache/lm_plugin/data",
                    help="where Fashion-MNIST's raw files are (make data / the demo puts them there)")
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    folder = args.out / "my_images"
    if not folder.exists():
        write_folder(folder, args.data_root)
    tf = transforms.Compose([transforms.Resize((32, 32)), transforms.Grayscale(3), transforms.ToTensor(),
                             transforms.Normalize(*IMAGENET)])
    train = torch.utils.data.DataLoader(ImageFolder(str(folder / "train"), tf), batch_size=64, shuffle=True)
    test = torch.utils.data.DataLoader(ImageFolder(str(folder / "test"), tf), batch_size=256)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.epochs * len(train))
    start, history = time.time(), []
    for epoch in range(args.epochs):
        model.train()
        for x, y in train:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test)
        history.append(100 * correct / len(test.dataset))
        print(f"epoch {epoch + 1}: test accuracy {history[-1]:.2f} % ({time.time() - start:.0f} s)", flush=True)
    torch.save(model.state_dict(), args.out / "resnet18.pt")
    (args.out / "training.json").write_text(json.dumps({"test_accuracy": history, "seconds": time.time() - start}))


if __name__ == "__main__":
    main()
