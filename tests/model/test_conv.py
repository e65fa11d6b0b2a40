"""Convolutional Hopfield networks: the architecture grammar, the analytic field against autograd
of the energy, the crossbar (unfold → mvm → fold) path against conv2d, the adjoints, the tile's
counts and its read noise per output position, and the fc-only network against LayeredHopfield."""

from dataclasses import dataclass

import pytest
import torch

from mep_hw.hw import Card, TileStore
import torch.nn.functional as F

from mep_hw.errors import ConfigError
from mep_hw.hw import IdealDevice, Periphery, Tile
from mep_hw.model import ConvCoupling, ConvHopfield, DenseCoupling, LayeredHopfield, build_network, format_arch, one_hot, parse_arch
from mep_hw.model.conv import ConvLayer, DenseLayer, _geometry, pool_adjoint, pool_forward

F64 = torch.float64


def conv_net(arch="conv:3:3:1,pool:2,conv:4:3,pool:2,fc:6,fc:4", shape=(2, 9, 9), activation="sigmoid", cost="mse", seed=1):
    m = ConvHopfield(arch, shape, activation=activation, cost=cost, generator=torch.Generator().manual_seed(seed), dtype=F64)
    with torch.no_grad():
        for b in m.biases:
            b.uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(seed + 7))
    return m


def batch(m, B=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, m.layers[0], generator=g, dtype=F64)
    y = one_hot(torch.randint(0, m.n_classes, (B,), generator=g), m.n_classes, F64)
    return x, y


class Matrix:
    """A plain matrix operator (not a DenseCoupling): forces the crossbar path."""

    def __init__(self, W):
        self.W, self.shape = W, tuple(W.shape)

    def mvm(self, x, add=None, *, x_in_bound=False):
        y = x @ self.W.T
        return y if add is None else y + add

    def mvm_t(self, u, add=None, *, x_in_bound=False):
        y = u @ self.W
        return y if add is None else y + add


# ----------------------------------------------------------------------------- grammar
def test_arch_strings_parse_and_round_trip():
    layers = parse_arch("conv:32:5, pool:2, conv:64:5,pool:2,fc:10")
    assert layers == (ConvLayer(32, 5, 0, "max", 2), ConvLayer(64, 5, 0, "max", 2), DenseLayer(10))
    assert format_arch(layers) == "conv:32:5,pool:2,conv:64:5,pool:2,fc:10"
    assert parse_arch("CONV:8:3:same,avgpool:2,fc:100,fc:10")[0] == ConvLayer(8, 3, 1, "avg", 2)
    assert parse_arch(format_arch(parse_arch("conv:4:3:1,maxpool:3,fc:2"))) == parse_arch("conv:4:3:1,pool:3,fc:2")
    assert parse_arch("fc:500,fc:10") == (DenseLayer(500), DenseLayer(10))


@pytest.mark.parametrize("spec,msg", [
    ("conv:32:5,pool:2", "must end with an fc layer"),
    ("fc:10,conv:3:3,fc:10", "comes after an fc layer"),
    ("pool:2,fc:10", "must follow a conv layer"),
    ("conv:3:3,pool:2,pool:2,fc:10", "must follow a conv layer directly"),
    ("conv:3,fc:10", "needs conv:C:K"),
    ("conv:0:3,fc:10", "the channel count C must be an integer ≥ 1, got '0'"),
    ("conv:3:x,fc:10", "the kernel size K must be an integer ≥ 1"),
    ("conv:3:4:same,fc:10", "'same' needs an odd kernel"),
    ("conv:3:3:3,fc:10", "padding 3 ≥ kernel 3"),
    ("dense:10", "unknown layer 'dense'.*valid layers: conv, pool, maxpool, avgpool, fc"),
    ("conv:3:3,,fc:10", "empty layer"),
    ("", "not an architecture string"),
    ("fc:-1", "the unit count N must be an integer ≥ 1"),
])
def test_bad_arch_strings_say_what_is_wrong(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_arch(spec)


def test_geometry_errors_name_the_layer():
    with pytest.raises(ConfigError, match=r"layer 2 \(conv:4:5\) gets a 2×2 input, smaller than its 5×5 kernel"):
        ConvHopfield("conv:3:5,pool:2,conv:4:5,fc:10", (1, 8, 8))
    with pytest.raises(ConfigError, match="pooling 8×8 of its 4×4 output leaves nothing"):
        ConvHopfield("conv:3:5,pool:8,fc:10", (1, 8, 8))
    with pytest.raises(ConfigError, match="needs image inputs"):
        ConvHopfield("conv:3:3,fc:10", (64,))
    with pytest.raises(ConfigError, match="ends with fc:10 but dataset 'x' has 4 classes"):
        build_network(arch="conv:3:3,fc:10", layers=None, input_shape=(1, 8, 8), n_classes=4, dataset="x")
    with pytest.raises(ConfigError, match="contradict arch"):
        build_network(arch="conv:3:3,fc:4", layers=(64, 100, 4), input_shape=(1, 8, 8), n_classes=4)
    with pytest.raises(ConfigError, match="cost='ce' uses the last fc layer as a readout"):
        ConvHopfield("fc:4", (1, 8, 8), cost="ce")


def test_layer_sizes_and_shapes():
    m = ConvHopfield("conv:32:5,pool:2,conv:64:5,pool:2,fc:10", (1, 28, 28))
    assert m.layers == (784, 32 * 12 * 12, 64 * 4 * 4, 10)
    assert [tuple(w.shape) for w in m.weights] == [(32, 25), (64, 800), (10, 1024)]
    assert [tuple(b.shape) for b in m.biases] == [(32,), (64,), (10,)]
    assert m.positions() == (24 * 24, 8 * 8, 1)
    ce = ConvHopfield("conv:8:3:same,pool:2,fc:10", (3, 32, 32), cost="ce")
    assert ce.layers == (3072, 8 * 16 * 16, 10) and ce.n_states == 1
    same = build_network(arch="conv:32:5,pool:2,conv:64:5,pool:2,fc:10", layers=m.layers, input_shape=(1, 28, 28), n_classes=10)
    assert same.layers == m.layers  # a resumed run stores the layer sizes: they must agree


# ----------------------------------------------------------------------------- the energy's field
@pytest.mark.parametrize("pool", ["pool:2", "avgpool:2", ""])
@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("cost", ["mse", "ce"])
@pytest.mark.parametrize("beta", [0.0, 0.7, "per-sample"])
def test_analytic_field_equals_autograd_of_the_energy(pool, activation, cost, beta):
    # 9×9 with padding 1 → 9×9 → pool 2 → 4×4 (a row and a column cut off) → 2×2 → 1×1
    arch = ",".join(t for t in ["conv:3:3:1", pool, "conv:4:3", pool, "fc:6", "fc:4"] if t)
    m = conv_net(arch, activation=activation, cost=cost)
    x, y = batch(m)
    if beta == "per-sample":
        beta = torch.tensor([[0.5], [-0.5], [1.2]], dtype=F64)
    g = torch.Generator().manual_seed(11)
    states = [torch.rand(3, n, generator=g, dtype=F64) * 1.6 - 0.3 for n in m.state_sizes]  # in and out of [0, 1]
    ours = m.dynamics(x, beta=beta, target=y).grad_energy(states)
    s = [t.clone().requires_grad_(True) for t in states]
    Fv = m.energy(x, s).sum()
    if not (isinstance(beta, float) and beta == 0.0):
        Fv = Fv + (m.cost_fn(s, y) * torch.as_tensor(beta, dtype=F64).reshape(-1)).sum()
    ref = torch.autograd.grad(Fv, s)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cost", ["mse", "ce"])
@pytest.mark.parametrize("beta", [0.0, 0.4, -1.5])
def test_box_field_is_the_scaled_projected_gradient(cost, beta):
    m = conv_net(activation="hard_sigmoid", cost=cost)
    x, y = batch(m)
    states = [torch.rand(3, n, generator=torch.Generator().manual_seed(5), dtype=F64) for n in m.state_sizes]
    field = m.dynamics(x, beta=beta, target=y).field(torch.cat(states, 1)).split(list(m.state_sizes), 1)
    s = [t.clone().requires_grad_(True) for t in states]
    dF = torch.autograd.grad((m.energy(x, s) + beta * m.cost_fn(s, y)).sum(), s)
    for i, (f, st, d) in enumerate(zip(field, states, dF)):
        D = 1.0 + beta if (cost == "mse" and i == len(states) - 1 and 1.0 + beta > 0) else 1.0
        torch.testing.assert_close(f, (st - d / D).clamp(0, 1) - st, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("cost", ["mse", "ce"])
def test_an_fc_only_arch_is_the_layered_hopfield_network(activation, cost):
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    c = ConvHopfield("fc:7,fc:5,fc:4", (6,), activation=activation, cost=cost, generator=gen(), dtype=F64)
    d = LayeredHopfield((6, 7, 5, 4), activation=activation, cost=cost, generator=gen(), dtype=F64)
    assert c.layers == d.layers and all(torch.equal(a, b) for a, b in zip(c.param_list(), d.param_list()))
    x, y = batch(c)
    s = torch.rand(3, sum(d.state_sizes), generator=gen(), dtype=F64)
    sa, sb = s.split(list(d.state_sizes), 1), (s * 0.5).split(list(d.state_sizes), 1)
    torch.testing.assert_close(c.dynamics(x, beta=0.3, target=y).field(s), d.dynamics(x, beta=0.3, target=y).field(s), rtol=0, atol=1e-15)
    torch.testing.assert_close(c.energy(x, sa), d.energy(x, sa), rtol=0, atol=1e-14)
    for a, b in zip(c.ep_contrast(x, sa, 0.3, sb, -0.3, y), d.ep_contrast(x, sa, 0.3, sb, -0.3, y)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("pool", ["pool:2", "avgpool:2"])
def test_ep_contrast_is_the_difference_of_autograd_parameter_gradients(pool):
    m = conv_net(f"conv:3:3:1,{pool},conv:4:3,{pool},fc:6,fc:4", cost="ce")
    x, y = batch(m)
    g = torch.Generator().manual_seed(2)
    sa = [torch.rand(3, n, generator=g, dtype=F64) for n in m.state_sizes]
    sb = [torch.rand(3, n, generator=g, dtype=F64) for n in m.state_sizes]

    def dF(s, beta):
        return torch.autograd.grad((m.energy(x, s) + beta * m.cost_fn(s, y)).mean(), m.param_list())

    ref = [(a - b) / (0.4 - (-0.2)) for a, b in zip(dF(sa, 0.4), dF(sb, -0.2))]
    for a, b in zip(m.ep_contrast(x, sa, 0.4, sb, -0.2, y), ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------- the coupling
def test_crossbar_path_equals_conv2d_and_is_its_own_adjoint():
    gm = _geometry(ConvLayer(5, 3, 1), (3, 7, 6), "layer 1")
    W = torch.randn(5, 27, dtype=F64)
    exact, bar = ConvCoupling(DenseCoupling(W), gm), ConvCoupling(Matrix(W), gm)
    assert exact.exact and not bar.exact
    x = torch.randn(4, 3, 7, 6, dtype=F64)
    u = torch.randn(4, 5, 7, 6, dtype=F64)
    ref = F.conv2d(x, W.view(5, 3, 3, 3), padding=1)
    torch.testing.assert_close(bar.conv(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(exact.conv(x), ref, rtol=0, atol=0)
    torch.testing.assert_close(bar.conv_t(u), exact.conv_t(u), rtol=1e-12, atol=1e-12)
    # ⟨W⋆x, u⟩ = ⟨x, Wᵀ⋆u⟩: conv_t is the adjoint
    torch.testing.assert_close((bar.conv(x) * u).sum(), (x * bar.conv_t(u)).sum(), rtol=1e-12, atol=0)
    # flattened, the coupling is a matrix operator of the unrolled convolution
    T = torch.stack([bar.mvm(e.unsqueeze(0))[0] for e in torch.eye(3 * 7 * 6, dtype=F64)], 1)
    torch.testing.assert_close(bar.mvm(x.flatten(1), torch.ones(4, 5 * 42, dtype=F64)), x.flatten(1) @ T.T + 1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bar.mvm_t(u.flatten(1)), u.flatten(1) @ T, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError, match=r"needs a \(5, 27\) kernel matrix, but the operator holds \(5, 26\)"):
        ConvCoupling(Matrix(torch.zeros(5, 26)), gm)


def test_complex_inputs_are_two_real_reads():
    gm = _geometry(ConvLayer(2, 3), (1, 5, 5), "l")
    W = torch.randn(2, 9, dtype=F64)
    x = torch.randn(2, 1, 5, 5, dtype=torch.complex128)
    for c in (ConvCoupling(DenseCoupling(W), gm), ConvCoupling(Matrix(W), gm)):
        ref = torch.complex(F.conv2d(x.real, W.view(2, 1, 3, 3)), F.conv2d(x.imag, W.view(2, 1, 3, 3)))
        torch.testing.assert_close(c.conv(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool,size,hw", [("max", 2, 8), ("max", 3, 8), ("avg", 2, 8), ("avg", 3, 8)])
def test_pooling_adjoint(pool, size, hw):
    g = _geometry(ConvLayer(3, 1, 0, pool, size), (3, hw, hw), "l")
    z = torch.randn(2, 3, hw, hw, dtype=F64)
    u = torch.randn(2, 3, g.h_out, g.w_out, dtype=F64)
    p, idx = pool_forward(z, g)
    torch.testing.assert_close(p, (F.max_pool2d if pool == "max" else F.avg_pool2d)(z, size), rtol=0, atol=1e-15)
    back = pool_adjoint(u, g, idx)
    assert back.shape == z.shape
    # ⟨P z, u⟩ = ⟨z, Pᵀu⟩ (max: P is linear once its arg-max is fixed); and Pᵀ is autograd's vjp
    torch.testing.assert_close((p * u).sum(), (z * back).sum(), rtol=1e-12, atol=0)
    zr = z.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad(((F.max_pool2d if pool == "max" else F.avg_pool2d)(zr, size) * u).sum(), zr)
    torch.testing.assert_close(back, vjp, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- on a tile
def test_a_tile_counts_one_read_per_output_position():
    per = Periphery(dac_bits=8, adc_bits=8)
    m = ConvHopfield("conv:4:3,pool:2,conv:6:3,fc:5", (2, 10, 10), generator=torch.Generator().manual_seed(0))
    m.use_store(TileStore(card_of(IdealDevice(), per), list(m.weights), seed=0))
    tiles = m.store.tiles
    B = 3
    dyn = m.dynamics(torch.rand(B, 200))
    # the phase starts with one read of the input array: W0 at 8×8 positions
    P0, P1 = 64, 4
    assert tiles[0].op_counts()[:3] == (B * P0 * 18 * 4, B * P0 * 18, B * P0 * 4)
    before = [t.op_counts() for t in tiles]
    dyn.field(torch.rand(B, sum(m.state_sizes)))
    d = [t.op_counts() - b for t, b in zip(tiles, before)]
    # a field evaluation: the input array's drive is held (no read); W1: 2×2 positions, forward and
    # transpose; W2 (fc): one read each way
    assert d[0].macs == 0
    assert d[1].macs == 2 * B * P1 * 36 * 6
    assert d[1].dac == B * P1 * 36 + B * P1 * 6 and d[1].adc == B * P1 * 6 + B * P1 * 36
    assert d[2].macs == 2 * B * 24 * 5


@dataclass(frozen=True, kw_only=True)
class _NoisyIdeal(IdealDevice):
    """Exact weights read with i.i.d. Gaussian noise of std σ per cell and read (normalised units)."""

    sigma: float = 0.05

    def read_std(self, state):
        return self.sigma


@pytest.mark.parametrize("sigma", [0.02, 0.1])
def test_read_noise_is_independent_per_output_position_with_the_crossbar_variance(sigma):
    # each output position is its own read of the kernel tile: Var = (w_scale σ)² Σ_patch x², and
    # the noise of two positions is uncorrelated; the transpose read's noise adds over the patches
    torch.manual_seed(0)
    g = _geometry(ConvLayer(4, 3, 1), (2, 6, 6), "l")
    W = torch.randn(4, 18, dtype=F64)
    tile = Tile(_NoisyIdeal(sigma=sigma), Periphery(), W, seed=3)
    c, exact = ConvCoupling(tile, g), ConvCoupling(DenseCoupling(tile.held()), g)
    x = torch.rand(2, 2, 6, 6, dtype=F64)
    reps = 800  # 2 × 4 × 36 × 800 ≈ 2.3e5 noise samples, read as one batch of 800 copies
    noise = (c.conv(x.repeat(reps, 1, 1, 1)) - exact.conv(x).repeat(reps, 1, 1, 1)).view(reps, 2, 4, 6, 6)
    patch_sq = F.unfold(x * x, 3, padding=1).sum(1).view(2, 1, 6, 6)  # Σ_patch x² per position
    std = tile.w_scale * sigma * patch_sq.sqrt()
    z = noise / std
    assert abs(float(z.mean())) < 0.01
    assert abs(float(z.std()) - 1.0) < 0.01
    r = float((z[..., :, :-1] * z[..., :, 1:]).mean())  # neighbouring positions
    assert abs(r) < 0.01
    u = torch.rand(2, 4, 6, 6, dtype=F64)
    noise_t = (c.conv_t(u.repeat(reps, 1, 1, 1)) - exact.conv_t(u).repeat(reps, 1, 1, 1)).view(reps, 2, 2, 6, 6)
    usq = (u * u).sum(1, keepdim=True).flatten(2).expand(2, 18, 36)  # ‖u_position‖² on every patch entry
    var_t = (tile.w_scale * sigma) ** 2 * F.fold(usq, (6, 6), 3, padding=1)
    zt = noise_t / var_t.sqrt()
    assert abs(float(zt.mean())) < 0.01 and abs(float(zt.std()) - 1.0) < 0.01


def card_of(device, periphery) -> Card:
    """A card made in Python (tests): ``device`` behind ``periphery``."""
    return Card(name="test", kind=device.kind, description="", source="test", device=device, periphery=periphery,
                sources={}, path="test")
