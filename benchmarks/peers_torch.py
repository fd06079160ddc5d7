"""The peers' side of ``benchmarks/peers.py``: PyTorch code timed in its own process.

Runs in the peers' virtualenv (``python -m benchmarks.peers --install``), never in ustad's: it
imports torch (and anomalib for STFPM) and nothing of ustad or JAX. Called as

    <peers-venv>/bin/python benchmarks/peers_torch.py MEASURE '{"warmup": 1, "repeats": 3, ...}'

and prints one JSON line: the median seconds of one timed call, the calls' seconds, the peak
RSS of the process, torch's version and thread count.

* STFPM: anomalib's own ``STFPMModel`` (ResNet-18 layer1–3 teacher and student, random weights:
  speed only, offline) and ``STFPMLoss``; the step is the one anomalib's Lightning module runs
  (forward, loss, backward, SGD(lr 0.4, momentum 0.9, weight decay 1e-3)) without Lightning's
  loop around it; scoring is the model's eval-mode forward (anomaly map and image score).
* Uninformed Students: our own faithful PyTorch port of the paper's patch networks as the most
  used PyTorch implementation (denguir/student-teacher-anomaly-detection) runs them: p = 65 and
  p = 33, 128-d descriptors (no decode layer, no dropout), fast dense extraction by multi-pooling
  and unwarping (Bailer et al.), the teacher recomputed under ``no_grad`` every step and the
  students trained one after another, each with its own Adam(1e-4, weight decay 1e-5).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 5e-3

# ("conv", kernel, features) | ("pool", size): the paper's tables as ustad reads them
# (ustad/uninformed_students/nets.py), the last convolution giving the 128-d descriptor.
ARCHITECTURES = {
    33: (("conv", 5, 128), ("pool", 2), ("conv", 5, 256), ("pool", 2), ("conv", 2, 256),
         ("conv", 4, 128)),
    65: (("conv", 5, 128), ("pool", 2), ("conv", 5, 128), ("pool", 2), ("conv", 5, 256),
         ("pool", 2), ("conv", 4, 256), ("conv", 1, 128)),
}  # fmt: skip


class PatchNet(nn.Module):
    """A p×p patch → 128-d descriptor CNN, run densely over whole images (NCHW).

    Valid convolutions, leaky ReLU (5e-3) after every convolution but the last, 2×2/2 max
    pooling turned into multi-pooling for dense extraction.
    """

    def __init__(self, patch_size: int, channels: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.table = ARCHITECTURES[patch_size]
        convs, width = [], channels
        for kind, size, *features in self.table:
            if kind == "conv":
                convs.append(nn.Conv2d(width, features[0], size))
                width = features[0]
        self.convs = nn.ModuleList(convs)
        self.strides = tuple(size for kind, size, *_ in self.table if kind == "pool")
        self.stride = 1
        for s in self.strides:
            self.stride *= s
        field = 1
        for kind, size, *_ in reversed(self.table):
            field = field + size - 1 if kind == "conv" else field * size
        # The same padding as ustad's dense_apply (R // 2 before, p − 1 − R // 2 after), so the
        # two give the same descriptors for the same weights.
        self.before = field // 2
        self.after = patch_size - 1 - self.before

    def dense(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` → ``[N, 128, H, W]``: every pixel's patch descriptor."""
        batch, _, height, width = images.shape
        x = F.pad(images, (self.before, self.after, self.before, self.after), mode="reflect")
        index = 0
        for kind, size, *_ in self.table:
            if kind == "pool":
                x = multi_max_pool(x, size)
                continue
            x = self.convs[index](x)
            index += 1
            if index < len(self.convs):
                x = F.leaky_relu(x, LEAKY_SLOPE)
        x = x[:, :, : height // self.stride, : width // self.stride]
        return unwarp(x, batch, self.strides)


def multi_max_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """The s² shifted s×s/s poolings of ``x`` [B, C, H, W], stacked offset-major on the batch
    axis and cropped to the size the largest offset allows."""
    out_h, out_w = (x.shape[2] - size + 1) // size, (x.shape[3] - size + 1) // size
    pooled = [
        F.max_pool2d(x[:, :, oy : oy + out_h * size, ox : ox + out_w * size], size, size)
        for oy in range(size)
        for ox in range(size)
    ]
    return torch.cat(pooled, 0)


def unwarp(stacked: torch.Tensor, batch: int, strides) -> torch.Tensor:
    """``[prod(s²)·N, D, Qh, Qw]`` (last pooling's offsets outermost) → ``[N, D, Qh·S, Qw·S]``."""
    levels = len(strides)
    if not levels:
        return stacked
    _, dim, qh, qw = stacked.shape
    shape = []
    for s in reversed(strides):
        shape += [s, s]
    x = stacked.reshape(*shape, batch, dim, qh, qw)
    n = 2 * levels
    oy, ox = [2 * i for i in range(levels)], [2 * i + 1 for i in range(levels)]
    x = x.permute(n, n + 1, n + 2, *oy, n + 3, *ox)
    total = 1
    for s in strides:
        total *= s
    return x.reshape(batch, dim, qh * total, qw * total)


def students_setup(options):
    patch_size, size = options["patch_size"], options["image_size"]
    torch.manual_seed(0)
    teacher = PatchNet(patch_size).eval()
    students = [PatchNet(patch_size) for _ in range(options["num_students"])]
    mean, std = torch.randn(1, 128, 1, 1) * 0.1, torch.rand(1, 128, 1, 1) + 0.5
    images = torch.rand(options["batch"], 3, size, size)
    return teacher, students, mean, std, images


def students_step(options):
    """One call = the teacher's normalised descriptors + one Adam step of each student."""
    teacher, students, mean, std, images = students_setup(options)
    optimizers = [torch.optim.Adam(s.parameters(), lr=1e-4, weight_decay=1e-5) for s in students]

    def call():
        with torch.no_grad():
            targets = (teacher.dense(images) - mean) / std
        losses = []
        for student, optimizer in zip(students, optimizers, strict=True):
            optimizer.zero_grad(set_to_none=True)
            loss = (student.dense(images) - targets).square().sum(1).mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return losses

    return call, options["batch"]


def students_score(options):
    """One call = the anomaly maps and image scores of ``images`` images, ``batch`` at a time."""
    teacher, students, mean, std, _ = students_setup(options)
    for student in students:
        student.eval()
    size = options["image_size"]
    images = torch.rand(options["images"], 3, size, size)
    e_mu, e_sd, v_mu, v_sd = 0.1, 1.2, 0.2, 1.3

    @torch.inference_mode()
    def call():
        scores = []
        for start in range(0, len(images), options["batch"]):
            x = images[start : start + options["batch"]]
            t = (teacher.dense(x) - mean) / std
            s = torch.stack([student.dense(x) for student in students], 1)  # [B, M, D, H, W]
            s_mean = s.mean(1)
            error = (s_mean - t).square().sum(1)
            variance = s.square().sum(2).mean(1) - s_mean.square().sum(1)
            score_map = (error - e_mu) / e_sd + (variance - v_mu) / v_sd
            scores.append(score_map.flatten(1).amax(1))
        return torch.cat(scores)

    return call, options["images"]


_TORCHVISION_SHIM = []


def torchvision_without_c_ops() -> bool:
    """Let torchvision's Python part import when its C extension cannot load.

    Where PyTorch's own CPU index cannot be reached, pip takes torchvision from PyPI, whose
    ``_C.so`` links CUDA libraries that a CPU torch lacks; torchvision then skips its C ops but
    still registers fake kernels for ``torchvision::nms`` and ``qnms`` unconditionally, and the
    import fails. Defining those two schemas lets it import; STFPM uses no torchvision operator
    (the pyramid is timm's ResNet-18). Returns whether the shim was needed.
    """
    if _TORCHVISION_SHIM:
        return True
    import ctypes
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import glob

    libraries = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    try:
        for library in libraries:
            ctypes.CDLL(library)
        return False
    except OSError:
        library = torch.library.Library("torchvision", "DEF")
        for name in ("nms", "qnms"):
            library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_SHIM.append(library)  # kept alive: the schema lives as long as the object
        return True


def anomalib_stfpm(options):
    """anomalib's STFPM torch model with random weights (its teacher's pretrained download is
    switched off: speed only, offline)."""
    options["torchvision_c_ops_missing"] = torchvision_without_c_ops()
    from anomalib.models.image.stfpm import torch_model

    original = torch_model.TimmFeatureExtractor

    def offline(*args, **kwargs):
        kwargs["pre_trained"] = False
        return original(*args, **kwargs)

    torch_model.TimmFeatureExtractor = offline
    try:
        model = torch_model.STFPMModel(layers=["layer1", "layer2", "layer3"], backbone="resnet18")
    finally:
        torch_model.TimmFeatureExtractor = original
    return model


def stfpm_training_setup(options):
    """anomalib's STFPM in training mode (teacher frozen), its loss, its optimizer
    (``Stfpm.configure_optimizers``) and a random batch: what a training step needs."""
    options["torchvision_c_ops_missing"] = torchvision_without_c_ops()
    from anomalib.models.image.stfpm.loss import STFPMLoss

    torch.manual_seed(0)
    model = anomalib_stfpm(options)
    model.train()
    model.teacher_model.eval()
    optimizer = torch.optim.SGD(
        model.student_model.parameters(), lr=0.4, momentum=0.9, dampening=0.0, weight_decay=0.001
    )
    size = options["image_size"]
    images = torch.rand(options["batch"], 3, size, size)
    return model, STFPMLoss(), optimizer, images


def stfpm_step(options):
    """One call = anomalib's training step: forward (teacher frozen), STFPMLoss, backward, SGD."""
    model, loss_fn, optimizer, images = stfpm_training_setup(options)

    def call():
        optimizer.zero_grad(set_to_none=True)
        teacher_features, student_features = model(images)
        loss = loss_fn(teacher_features, student_features)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return call, options["batch"]


def stfpm_score(options):
    """One call = the eval-mode forward (anomaly map + image score) of ``images`` images."""
    torch.manual_seed(0)
    model = anomalib_stfpm(options).eval()
    size = options["image_size"]
    images = torch.rand(options["images"], 3, size, size)

    @torch.inference_mode()
    def call():
        outs = []
        for start in range(0, len(images), options["batch"]):
            out = model(images[start : start + options["batch"]])
            outs.append(out.pred_score)
        return outs

    return call, options["images"]


def students_pieces(options):
    """The pieces of :func:`students_step`: the teacher's dense pass, one student's forward and
    backward, the M students' Adam steps on given targets, the full step."""
    teacher, students, mean, std, images = students_setup(options)
    optimizers = [torch.optim.Adam(s.parameters(), lr=1e-4, weight_decay=1e-5) for s in students]
    with torch.no_grad():
        targets = (teacher.dense(images) - mean) / std
    full, _ = students_step(options)

    def teacher_dense():
        with torch.no_grad():
            return (teacher.dense(images) - mean) / std

    def forward_backward():
        students[0].zero_grad(set_to_none=True)
        loss = (students[0].dense(images) - targets).square().sum(1).mean()
        loss.backward()
        return loss.detach()

    def cached_step():
        for student, optimizer in zip(students, optimizers, strict=True):
            optimizer.zero_grad(set_to_none=True)
            loss = (student.dense(images) - targets).square().sum(1).mean()
            loss.backward()
            optimizer.step()

    return {
        "teacher_dense": teacher_dense,
        "student_forward_backward": forward_backward,
        "step_cached_targets": cached_step,
        "step": full,
    }


def stfpm_pieces(options):
    """The pieces of :func:`stfpm_step`: the teacher's forward, the student's forward (train
    mode), its forward and backward (no optimizer), the step on given teacher maps, the step."""
    model, loss_fn, optimizer, images = stfpm_training_setup(options)
    with torch.no_grad():
        targets = model.teacher_model(images)
    full, _ = stfpm_step(options)

    def teacher_forward():
        with torch.no_grad():
            return model.teacher_model(images)

    def student_forward():
        with torch.no_grad():
            return model.student_model(images)

    def forward_backward():
        model.student_model.zero_grad(set_to_none=True)
        loss = loss_fn(targets, model.student_model(images))
        loss.backward()
        return loss.detach()

    def cached_step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(targets, model.student_model(images))
        loss.backward()
        optimizer.step()
        return loss.detach()

    return {
        "teacher_forward": teacher_forward,
        "student_forward_train": student_forward,
        "student_forward_backward": forward_backward,
        "step_cached_teacher_maps": cached_step,
        "step": full,
    }


CASES = {
    "stfpm_pieces": stfpm_pieces,
    "us_pieces": students_pieces,
    "us_step": students_step,
    "us_score": students_score,
    "stfpm_step": stfpm_step,
    "stfpm_score": stfpm_score,
}


def run(case: str, options: dict) -> dict:
    threads = int(options.get("threads") or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    built = CASES[case](options)
    pieces = built if isinstance(built, dict) else {"call": built[0]}
    timed = {}
    for name, call in pieces.items():
        for _ in range(options["warmup"]):
            call()
        times = []
        for _ in range(options["repeats"]):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        timed[name] = times
    versions = {"torch": torch.__version__}
    if case.startswith("stfpm"):
        import anomalib

        versions["anomalib"] = anomalib.__version__
    if isinstance(built, dict):
        medians = {name: round(statistics.median(t), 4) for name, t in timed.items()}
        result = {"seconds": sum(medians.values()), "pieces": {
            name: {"seconds": seconds} for name, seconds in medians.items()}}  # fmt: skip
    else:
        times = timed["call"]
        result = {"seconds": statistics.median(times), "times": [round(t, 4) for t in times]}
    return {
        **result,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "versions": versions,
        "threads": {"torch_intra_op": torch.get_num_threads()},
    }


def check_port(options) -> dict:
    """The port's dense descriptors for ustad's weights and images (``write_port_check``):
    the largest absolute difference from ustad's, over all pixels and channels."""
    import numpy as np

    arrays = np.load(options["path"])
    net = PatchNet(options["patch_size"]).eval()
    with torch.no_grad():
        for index, conv in enumerate(net.convs, start=1):
            kernel = torch.from_numpy(arrays[f"conv{index}/kernel"])  # [kh, kw, in, out]
            conv.weight.copy_(kernel.permute(3, 2, 0, 1))
            conv.bias.copy_(torch.from_numpy(arrays[f"conv{index}/bias"]))
        images = torch.from_numpy(arrays["images"]).permute(0, 3, 1, 2)
        ours = net.dense(images).permute(0, 2, 3, 1).numpy()
    reference = arrays["descriptors"]
    return {
        "max_abs_diff": float(np.abs(ours - reference).max()),
        "max_abs_value": float(np.abs(reference).max()),
        "shape": list(ours.shape),
    }


def versions() -> dict:
    """The peers' versions, after importing what the measures use (the install's check)."""
    from importlib.metadata import version

    shim = torchvision_without_c_ops()
    from anomalib.models.image.stfpm import torch_model  # noqa: F401

    names = ("torch", "torchvision", "anomalib", "timm")
    return {**{name: version(name) for name in names}, "torchvision_c_ops_missing": shim}


if __name__ == "__main__":
    if sys.argv[1:] == ["--versions"]:
        print(json.dumps(versions()), flush=True)
        sys.exit()
    if len(sys.argv) == 3 and sys.argv[1] == "check_port":
        print(json.dumps(check_port(json.loads(sys.argv[2]))), flush=True)
        sys.exit()
    if len(sys.argv) != 3 or sys.argv[1] not in CASES:
        sys.exit(f"usage: peers_torch.py {{{','.join(CASES)}}} OPTIONS_JSON")
    print(json.dumps(run(sys.argv[1], json.loads(sys.argv[2]))), flush=True)
