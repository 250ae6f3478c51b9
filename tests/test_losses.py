"""Losses and methods against dense references written independently here (float64)."""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from softlabels.errors import InvalidTargetsError, SoftlabelsError, SpecError
from softlabels.losses import (
    STORE_CONSTANTS,
    HintRegressor,
    LossOutput,
    build_method,
    cross_entropy,
    hint_loss,
    kd_loss,
    kl_divergence,
    label_smoothing_loss,
    list_methods,
    method_defaults,
    soft_cross_entropy,
)
from softlabels.targets import summarize_logits

TEMPS = [1.0, 2.0, 4.0]
FEAT = "features/penultimate"
D_STUDENT, D_TEACHER, D_CLS = 6, 5, 7
SHAPES = [(3, 2), (8, 10), (16, 100)]
SEEDS = [0, 1]
# Build-time inputs a method needs beyond the store constants (extend when registering one).
EXTRA = {"hint": {"student_feature_shape": (D_STUDENT,)}}


# ---------------------------------------------------------------------------------------
# Independent dense references (float64, by hand: no F.kl_div / F.cross_entropy)
# ---------------------------------------------------------------------------------------
def ref_log_softmax(x):
    x = x.double()
    m = x.max(dim=-1, keepdim=True).values
    return x - m - torch.log(torch.exp(x - m).sum(-1, keepdim=True))


def ref_softmax(x):
    return torch.exp(ref_log_softmax(x))


def ref_ce(zs, y):
    logq = ref_log_softmax(zs)
    return -torch.stack([logq[b, y[b]] for b in range(len(y))]).mean()


def ref_kl(zs, p, T):
    logq = ref_log_softmax(zs / T)
    p = p.double()
    terms = torch.where(p > 0, p * (torch.log(p.clamp(min=1e-300)) - logq), torch.zeros_like(p))
    return terms.sum() / zs.shape[0]  # per-sample sum over classes, mean over batch


def ref_kd(zs, p, y, T, ce_w, kd_w):
    kd = kd_w * T * T * ref_kl(zs, p, T)
    return kd if y is None else kd + ce_w * ref_ce(zs, y)


def ref_topk_target(zt, k, T):
    p = ref_softmax(zt / T)
    B, C = p.shape
    out = torch.empty_like(p)
    for b in range(B):
        order = torch.argsort(zt[b], descending=True)[:k]
        kept = p[b, order]
        out[b] = (1.0 - kept.sum()) / (C - k) if k < C else 0.0
        out[b, order] = kept
    return out


def ref_pt_target(zt, y, T):
    p = ref_softmax(zt / T)
    B, C = p.shape
    out = torch.empty_like(p)
    for b in range(B):
        py = p[b, y[b]]
        out[b] = (1.0 - py) / (C - 1)
        out[b, y[b]] = py
    return out


def ref_sim_target(W, y, rho, T):
    W = W.double()
    Wn = W / torch.sqrt((W * W).sum(-1, keepdim=True))
    cos = (Wn @ Wn.T).clamp(-1, 1)
    s = torch.sign(cos) * torch.abs(cos) ** rho
    return ref_softmax(s[y] / T)


def ref_ls(zs, y, eps):
    logq = ref_log_softmax(zs)
    C = zs.shape[-1]
    per = torch.stack([-(1 - eps) * logq[b, y[b]] - eps / C * logq[b].sum() for b in range(len(y))])
    return per.mean()


def ref_hint(method, fs, ft):
    lin = method.regressor.proj
    r = fs.double() @ lin.weight.detach().double().T + lin.bias.detach().double()
    return ((r - ft.double()) ** 2).mean()


def ref_method(method, zs, y, case):
    """Dense-reference total loss of a built method, from the dense teacher logits."""
    name, zt, W = method.name, case["zt"], case["W"]
    T = method.temperature
    hp = method.hparams
    if name == "ce":
        return ref_ce(zs, y)
    if name == "ls":
        return ref_ls(zs, y, hp["epsilon"])
    if name == "hint":
        total = hp["hint_weight"] * ref_hint(method, case["fs"], case["targets"][FEAT])
        if hp["kd_weight"] > 0:
            return total + ref_kd(zs, ref_topk_target(zt, zt.shape[-1], T), y, T, hp["ce_weight"], hp["kd_weight"])
        return total + hp["ce_weight"] * ref_ce(zs, y)
    k = zt.shape[-1] if name == "kd" or hp.get("k") is None else hp["k"]
    target = {
        "kd": lambda: ref_topk_target(zt, k, T),
        "kd-topk": lambda: ref_topk_target(zt, k, T),
        "kd-pt": lambda: ref_pt_target(zt, y, T),
        "kd-sim": lambda: ref_sim_target(W, y, hp["rho"], T),
        "kd-pt+sim": lambda: 0.5 * (ref_pt_target(zt, y, T) + ref_sim_target(W, y, hp["rho"], T)),
    }[name]()
    return ref_kd(zs, target, y, T, hp["ce_weight"], hp["kd_weight"])


# ---------------------------------------------------------------------------------------
# A fake batch "read from a store"
# ---------------------------------------------------------------------------------------
def make_case(name, B, C, seed, *, k=None, value_dtype=torch.float32, **hparams):
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(B, C, generator=g, dtype=torch.float64) * 3.0
    zs = (torch.randn(B, C, generator=g) * 2.0).requires_grad_(True)
    y = torch.randint(0, C, (B,), generator=g)
    W = torch.randn(C, D_CLS, generator=g)
    ft = torch.randn(B, D_TEACHER, generator=g)
    fs = torch.randn(B, D_STUDENT, generator=g).requires_grad_(True)
    torch.manual_seed(seed)  # regressor init
    method = build_method(
        name,
        num_classes=C,
        classifier_weight=W,
        teacher_feature_shape=(D_TEACHER,),
        **{**EXTRA.get(name, {}), **hparams},
    )
    T = method.temperature or 4.0
    s = summarize_logits(zt, k=k or C, temperatures=TEMPS, labels=y)
    targets = {
        "topk_values": s["topk_values"].to(value_dtype),
        "topk_indices": s["topk_indices"].to(torch.int32),
        "logsumexp": s["logsumexp"][:, TEMPS.index(T)],
        "label_logit": s["label_logit"],
        FEAT: ft.half(),  # the store keeps features as float16
    }
    return {"method": method, "zt": zt, "zs": zs, "y": y, "W": W, "fs": fs, "targets": targets, "T": T}


def run(case, labels="y", stage=None):
    y = case["y"] if labels == "y" else labels
    return case["method"](case["zs"], y, case["targets"], student_features=case["fs"], stage=stage)


def weights_of(method):
    return {c: method.hparams.get(f"{c}_weight", 1.0) for c in ("ce", "kd", "hint", "ls")}


def test_required_methods_registered():
    assert {"ce", "ls", "kd", "kd-topk", "kd-pt", "kd-sim", "kd-pt+sim", "hint"} <= set(list_methods())


# ---------------------------------------------------------------------------------------
# Every registered method, for free
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_methods())
@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_method_matches_dense_reference(name, B, C, seed):
    case = make_case(name, B, C, seed)
    out = run(case)
    assert isinstance(out, LossOutput) and out.total.dim() == 0 and out.total.dtype == torch.float32
    assert torch.isfinite(out.total)
    ref = ref_method(case["method"], case["zs"].detach(), case["y"], case)
    assert out.total.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)
    # components are detached, unweighted, and recombine into the total
    w = weights_of(case["method"])
    assert all(not v.requires_grad for v in out.components.values())
    recombined = sum(w[c] * v for c, v in out.components.items())
    assert recombined.item() == pytest.approx(out.total.item(), rel=1e-6, abs=1e-6)
    out.total.backward()
    assert case["zs"].grad is not None and torch.isfinite(case["zs"].grad).all()
    if name == "hint":
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in case["method"].parameters())


@pytest.mark.parametrize("name", list_methods())
def test_method_empty_batch_is_zero_not_nan(name):
    case = make_case(name, 0, 10, 0)
    out = run(case)
    assert out.total.item() == 0.0 and not torch.isnan(out.total)
    out.total.backward()
    assert case["zs"].grad is not None and case["zs"].grad.shape == (0, 10)


@pytest.mark.parametrize("name", list_methods())
def test_method_upcasts_half_logits(name):
    case = make_case(name, 4, 10, 0)
    case["zs"] = case["zs"].detach().bfloat16().requires_grad_(True)
    out = run(case)
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)
    out.total.backward()
    assert case["zs"].grad.dtype == torch.bfloat16


@pytest.mark.parametrize("name", list_methods())
def test_method_declares_fields_and_defaults(name):
    case = make_case(name, 2, 10, 0)
    m = case["method"]
    assert set(m.needs) <= set(case["targets"])
    # exactly the declared fields suffice
    only = {k: v for k, v in case["targets"].items() if k in m.needs}
    out = m(case["zs"], case["y"], only, student_features=case["fs"])
    assert torch.isfinite(out.total)
    # every build argument has a default (required inputs default to None, checked at build)
    assert all(v is not inspect.Parameter.empty for v in method_defaults(name).values())
    if "logsumexp" in m.needs:
        assert m.temperature in TEMPS


# ---------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("T", [1.0, 2.5, 4.0])
def test_pure_functions_float64_exact(B, C, T):
    g = torch.Generator().manual_seed(C)
    zs = torch.randn(B, C, generator=g, dtype=torch.float64)
    p = ref_softmax(torch.randn(B, C, generator=g, dtype=torch.float64) * 2 / T)
    y = torch.randint(0, C, (B,), generator=g)
    assert kl_divergence(zs, p, T).item() == pytest.approx(ref_kl(zs, p, T).item(), rel=1e-12, abs=1e-14)
    entropy = -(p * p.log()).sum() / B
    assert soft_cross_entropy(zs, p, T).item() == pytest.approx((ref_kl(zs, p, T) + entropy).item(), rel=1e-12)
    assert cross_entropy(zs, y).item() == pytest.approx(ref_ce(zs, y).item(), rel=1e-12)
    out = kd_loss(zs, p, y, temperature=T, ce_weight=0.3, kd_weight=0.7)
    assert out.total.item() == pytest.approx(ref_kd(zs, p, y, T, 0.3, 0.7).item(), rel=1e-12)
    assert set(out.components) == {"ce", "kd"}
    # agrees with PyTorch's own batchmean KL (what peers use), times T^2
    torch_kd = F.kl_div(F.log_softmax(zs / T, -1), p, reduction="batchmean") * T * T
    assert out.components["kd"].item() == pytest.approx(torch_kd.item(), rel=1e-12)


def test_kl_is_batchmean_not_mean():
    """Adding C classes that both teacher and student give zero mass must not change the loss
    (per-sample sum over classes); the classic 'mean' reduction would halve it."""
    g = torch.Generator().manual_seed(0)
    B, C, T = 6, 10, 4.0
    zs = torch.randn(B, C, generator=g, dtype=torch.float64)
    p = ref_softmax(torch.randn(B, C, generator=g, dtype=torch.float64))
    base = kd_loss(zs, p, None, temperature=T, kd_weight=1.0).total
    zs_pad = torch.cat([zs, torch.full((B, C), -math.inf, dtype=torch.float64)], -1).requires_grad_(True)
    p_pad = torch.cat([p, torch.zeros(B, C, dtype=torch.float64)], -1)
    padded = kd_loss(zs_pad, p_pad, None, temperature=T, kd_weight=1.0).total
    assert padded.item() == pytest.approx(base.item(), rel=1e-12)
    padded.backward()
    assert torch.isfinite(zs_pad.grad).all()

    def mean_bug(z, q):  # reduction='mean': sum over classes AND batch, divided by B * C
        return T * T * ref_kl(z, q, T).item() * z.shape[0] / (z.shape[0] * z.shape[1])

    assert base.item() == pytest.approx(mean_bug(zs, p) * C, rel=1e-12)
    assert mean_bug(zs_pad.detach(), p_pad) == pytest.approx(mean_bug(zs, p) / 2, rel=1e-12)  # bug halves it


def test_zero_teacher_probs_give_finite_loss_and_grad():
    zs = torch.tensor([[5.0, -1e4, 0.0, -math.inf], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]])
    for fn in (kl_divergence, soft_cross_entropy):
        loss = fn(zs, p, 2.0)
        (g,) = torch.autograd.grad(loss, zs)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert kl_divergence(zs[1:].detach(), torch.full((1, 4), 0.25), 1.0).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 8.0])
def test_t_squared_scaling_gradient_formula(T):
    """d/dz_s [T^2 KL(p(T) || q(T))] = T (q(T) - p(T)) / B exactly."""
    g = torch.Generator().manual_seed(1)
    B, C = 5, 7
    zs = torch.randn(B, C, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(B, C, generator=g, dtype=torch.float64)
    p = ref_softmax(zt / T)
    loss = kd_loss(zs, p, None, temperature=T, ce_weight=0.0, kd_weight=1.0).total
    (grad,) = torch.autograd.grad(loss, zs)
    expected = T * (ref_softmax(zs.detach() / T) - p) / B
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_t_squared_keeps_gradient_magnitude_for_small_logits():
    g = torch.Generator().manual_seed(2)
    zs = (torch.randn(8, 10, generator=g, dtype=torch.float64) * 0.05).requires_grad_(True)
    zt = torch.randn(8, 10, generator=g, dtype=torch.float64) * 0.05

    def grad_norm(T, scaled):
        loss = kd_loss(zs, ref_softmax(zt / T), None, temperature=T, kd_weight=1.0).total
        if not scaled:
            loss = loss / (T * T)
        return torch.autograd.grad(loss, zs)[0].norm().item()

    assert grad_norm(8.0, True) == pytest.approx(grad_norm(1.0, True), rel=0.05)
    # without T^2 the soft-target gradients shrink as 1/T^2 (Hinton et al. 2015, sec. 2)
    assert grad_norm(1.0, False) / grad_norm(8.0, False) == pytest.approx(64.0, rel=0.05)


def test_cross_entropy_ignores_unlabelled_rows_and_empty():
    zs = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([2, -1, 0, -1])
    assert cross_entropy(zs, y).item() == pytest.approx(ref_ce(zs[[0, 2]].detach(), y[[0, 2]]).item(), rel=1e-12)
    none = cross_entropy(zs, torch.full((4,), -1))
    assert none.item() == 0.0
    none.backward()
    empty = cross_entropy(torch.zeros(0, 5, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0 and not torch.isnan(empty)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_is_kd_with_uniform_teacher(eps):
    g = torch.Generator().manual_seed(3)
    B, C = 6, 9
    zs = torch.randn(B, C, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (B,), generator=g)
    ls = label_smoothing_loss(zs, y, epsilon=eps)
    assert ls.item() == pytest.approx(ref_ls(zs.detach(), y, eps).item(), rel=1e-12)
    assert ls.item() == pytest.approx(F.cross_entropy(zs, y, label_smoothing=eps).item(), rel=1e-12)
    target = (1 - eps) * F.one_hot(y, C).double() + eps / C
    kd = kd_loss(zs, target, None, temperature=1.0, kd_weight=1.0).total
    entropy = -torch.where(target > 0, target * target.clamp(min=1e-300).log(), torch.zeros_like(target)).sum() / B
    assert ls.item() == pytest.approx((kd + entropy).item(), rel=1e-12)  # same up to the constant H(target)
    torch.testing.assert_close(torch.autograd.grad(ls, zs)[0], torch.autograd.grad(kd, zs)[0])


# ---------------------------------------------------------------------------------------
# Store round trip
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", TEMPS)
@pytest.mark.parametrize("seed", SEEDS)
def test_kd_from_full_k_store_equals_dense_kd(T, seed):
    case = make_case("kd", 16, 50, seed, temperature=T)
    out = run(case)
    dense = ref_kd(case["zs"].detach(), ref_softmax(case["zt"] / T), case["y"], T, 0.1, 0.9)
    assert out.total.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-5)


FP16_EPS = 2.0**-11  # unit roundoff of float16 (round to nearest)


@pytest.mark.parametrize("T", TEMPS)
@pytest.mark.parametrize("scale", [1.0, 5.0, 10.0])
def test_kd_from_float16_store_within_first_order_bound(T, scale):
    """float16 values perturb each logit by |dz| <= eps16 * max|z|. The teacher log-probs at T
    move by at most 2 * eps16 * max|z| / T, so to first order
    |dL| <= 2 * eps16 * T * max|z| * mean_b sum_c p |log p - log q|   (L = T^2 KL);
    documented in docs/LOSSES.md (~1e-4 relative in practice for |z| <= 30)."""
    g = torch.Generator().manual_seed(int(scale * 10 + T))
    B, C = 32, 100
    zt = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    zs = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    s = summarize_logits(zt, k=C, temperatures=TEMPS)
    targets = {
        "topk_values": s["topk_values"].half(),
        "topk_indices": s["topk_indices"],
        "logsumexp": s["logsumexp"][:, TEMPS.index(T)],
    }
    m = build_method("kd", temperature=T, ce_weight=0.0, kd_weight=1.0)
    got = m(zs, None, targets).total.item()
    p = ref_softmax(zt / T)
    exact = ref_kd(zs, p, None, T, 0.0, 1.0).item()
    abs_log_ratio = (p * (p.log() - ref_log_softmax(zs / T)).abs()).sum(-1).mean().item()
    bound = 2 * FP16_EPS * T * zt.abs().max().item() * abs_log_ratio
    assert abs(got - exact) <= bound + 1e-5
    assert abs(got - exact) <= 1e-3 * exact + 1e-5  # the practical tolerance quoted in the docs


def test_store_dtypes_uint16_indices_float16_values():
    """What the reader hands over: float16 values, uint16 indices (C <= 65,536)."""
    case = make_case("kd-topk", 8, 12, 0, k=5)
    ref = run(case).total.item()
    t = case["targets"]
    t["topk_indices"] = torch.as_tensor(t["topk_indices"].numpy().astype("uint16"))
    assert t["topk_indices"].dtype == torch.uint16
    assert run(case).total.item() == pytest.approx(ref, rel=1e-7)


def test_kd_topk_with_k_equal_c_equals_kd():
    a = make_case("kd", 8, 12, 0)
    b = make_case("kd-topk", 8, 12, 0, k=12)
    assert run(a).total.item() == pytest.approx(run(b).total.item(), rel=1e-7)
    torch.testing.assert_close(
        a["method"].teacher_distribution(a["y"], a["targets"], 12),
        b["method"].teacher_distribution(b["y"], b["targets"], 12),
    )


@pytest.mark.parametrize("k", [1, 3, 7])
def test_kd_topk_uses_first_k_of_stored(k):
    full = make_case("kd-topk", 8, 12, 1, k=12)  # store with top-12 ...
    sub = build_method("kd-topk", k=k, num_classes=12)  # ... method uses its first k
    dumped_k = make_case("kd-topk", 8, 12, 1, k=k)  # same as a store dumped with --k k
    a = sub(full["zs"], full["y"], full["targets"]).total
    b = run(dumped_k).total
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    ref = ref_kd(full["zs"].detach(), ref_topk_target(full["zt"], k, 4.0), full["y"], 4.0, 0.1, 0.9)
    assert a.item() == pytest.approx(ref.item(), rel=1e-5)
    dist = sub.teacher_distribution(full["y"], full["targets"], 12)
    torch.testing.assert_close(dist.sum(-1), torch.ones(8), rtol=0, atol=1e-6)


def test_kd_topk_k_larger_than_stored_raises():
    case = make_case("kd-topk", 4, 10, 0, k=3)
    with pytest.raises(InvalidTargetsError, match="top-3"):
        build_method("kd-topk", k=5)(case["zs"], case["y"], case["targets"])


def test_kd_with_partial_store_is_kd_topk_and_warns():
    a = make_case("kd", 8, 20, 2, k=5)
    b = make_case("kd-topk", 8, 20, 2, k=5)
    with pytest.warns(UserWarning, match="top-5 of 20"):
        ka = run(a).total
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(a)  # warns once per method instance
    assert ka.item() == pytest.approx(run(b).total.item(), rel=1e-7)


def test_kd_pt_target():
    case = make_case("kd-pt", 8, 10, 0, temperature=2.0)
    m, y = case["method"], case["y"]
    dist = m.teacher_distribution(y, case["targets"], 10).double()
    torch.testing.assert_close(dist.sum(-1), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-6)
    p_y = ref_softmax(case["zt"] / 2.0)[torch.arange(8), y]
    torch.testing.assert_close(dist[torch.arange(8), y], p_y, rtol=1e-5, atol=1e-6)
    others = dist.clone()
    others[torch.arange(8), y] = float("nan")
    for b in range(8):
        row = others[b][~torch.isnan(others[b])]
        torch.testing.assert_close(row, torch.full_like(row, (1 - p_y[b].item()) / 9), rtol=1e-5, atol=1e-7)


def test_kd_pt_plus_sim_is_average():
    pt = make_case("kd-pt", 8, 10, 3)
    sim = make_case("kd-sim", 8, 10, 3)
    both = make_case("kd-pt+sim", 8, 10, 3)
    args = (pt["y"], pt["targets"], 10)
    avg = 0.5 * (pt["method"].teacher_distribution(*args) + sim["method"].teacher_distribution(*args))
    torch.testing.assert_close(both["method"].teacher_distribution(*args), avg)
    torch.testing.assert_close(avg.sum(-1), torch.ones(8), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rho", [0.5, 1.0, 2.0, 3.0])
def test_kd_sim_target_matches_reference(rho):
    case = make_case("kd-sim", 6, 10, 4, rho=rho)
    dist = case["method"].teacher_distribution(case["y"], {}, 10)
    torch.testing.assert_close(dist.double(), ref_sim_target(case["W"], case["y"], rho, 4.0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kd", "kd-topk", "hint"])
def test_unlabelled_transfer_set(name):
    case = make_case(name, 8, 10, 5)
    out = run(case, labels=None)
    assert "ce" not in out.components and torch.isfinite(out.total)
    m = case["method"]
    if name != "hint":
        dense = ref_kd(case["zs"].detach(), ref_softmax(case["zt"] / m.temperature), None, m.temperature, 0, 0.9)
        assert out.total.item() == pytest.approx(dense.item(), rel=1e-5)
    out.total.backward()


@pytest.mark.parametrize("name", ["ce", "ls", "kd-pt", "kd-sim", "kd-pt+sim"])
def test_methods_needing_labels_raise_clearly(name):
    case = make_case(name, 4, 10, 0)
    with pytest.raises(SoftlabelsError, match="needs ground-truth labels"):
        run(case, labels=None)
    with pytest.raises(SoftlabelsError, match="unlabelled samples"):
        run(case, labels=torch.tensor([1, -1, 2, 3]))


def test_kd_ignores_unlabelled_rows_in_ce():
    case = make_case("kd", 4, 10, 6)
    y = torch.tensor([3, -1, 7, -1])
    out = run(case, labels=y)
    zs = case["zs"].detach()
    expected = 0.1 * ref_ce(zs[[0, 2]], y[[0, 2]]) + 0.9 * 16 * ref_kl(zs, ref_softmax(case["zt"] / 4), 4.0)
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------
# Hints
# ---------------------------------------------------------------------------------------
def test_hint_regressor_shapes():
    lin = HintRegressor((6,), (4,))
    assert isinstance(lin.proj, torch.nn.Linear) and lin(torch.randn(3, 6)).shape == (3, 4)
    conv = HintRegressor((8, 5, 5), (3, 5, 5))
    assert isinstance(conv.proj, torch.nn.Conv2d) and conv.proj.kernel_size == (1, 1)
    x = torch.randn(2, 8, 5, 5)
    expected = torch.einsum("oc,bchw->bohw", conv.proj.weight[:, :, 0, 0], x) + conv.proj.bias[None, :, None, None]
    torch.testing.assert_close(conv(x), expected)
    with pytest.raises(SpecError, match="spatial"):
        HintRegressor((8, 5, 5), (3, 4, 4))
    with pytest.raises(SpecError):
        HintRegressor((8,), (3, 4, 4))
    with pytest.raises(InvalidTargetsError):
        lin(torch.randn(3, 5))


def test_hint_loss_is_per_element_mse():
    a, b = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert hint_loss(a, b).item() == pytest.approx(((a - b) ** 2).sum().item() / a.numel(), rel=1e-12)
    with pytest.raises(InvalidTargetsError):
        hint_loss(a, b[:, :2])


def test_hint_joint_defaults_are_repdistiller():
    m = build_method("hint", student_feature_shape=4, teacher_feature_shape=3)
    assert (m.mode, m.ce_weight, m.hint_weight, m.kd_weight) == ("joint", 1.0, 100.0, 0.0)
    assert m.needs == {FEAT} and m.stages == ("main",) and m.stage(0, 10) == "main"
    assert m.uses_features and len(list(m.parameters())) == 2  # regressor weight + bias, for the optimizer


def test_hint_two_stage_schedule_and_losses():
    case = make_case("hint", 8, 10, 7, mode="two-stage")
    m = case["method"]
    assert (m.ce_weight, m.kd_weight) == (0.1, 0.9)
    assert m.needs == {FEAT, "topk_values", "topk_indices", "logsumexp"}
    assert [m.stage(e, 10) for e in range(10)] == ["hint"] * 2 + ["kd"] * 8
    assert [m.stage(e, 1) for e in range(1)] == ["kd"]
    explicit = build_method("hint", mode="two-stage", hint_epochs=3, student_feature_shape=6, teacher_feature_shape=5)
    assert [explicit.stage(e, 5) for e in range(5)] == ["hint"] * 3 + ["kd"] * 2
    with pytest.raises(SpecError, match="stage"):
        run(case)
    # stage 1: hints only; the logits get no gradient, the regressor does
    h = run(case, stage="hint")
    assert set(h.components) == {"hint"}
    assert h.total.item() == pytest.approx(100 * ref_hint(m, case["fs"], case["targets"][FEAT]).item(), rel=1e-5)
    h.total.backward()
    assert torch.count_nonzero(case["zs"].grad) == 0 and m.regressor.proj.weight.grad.abs().sum() > 0
    # stage 2: plain KD from the store, features not needed
    no_feat = {k: v for k, v in case["targets"].items() if k != FEAT}
    kd = m(case["zs"], case["y"], no_feat, stage="kd")
    dense = ref_kd(case["zs"].detach(), ref_softmax(case["zt"] / 4), case["y"], 4.0, 0.1, 0.9)
    assert set(kd.components) == {"ce", "kd"} and kd.total.item() == pytest.approx(dense.item(), rel=1e-5)


def test_hint_joint_with_kd_term():
    case = make_case("hint", 8, 10, 8, kd_weight=0.5)
    out = run(case)
    assert set(out.components) == {"ce", "kd", "hint"}
    ref = ref_method(case["method"], case["zs"].detach(), case["y"], case)
    assert out.total.item() == pytest.approx(ref.item(), rel=1e-5)


def test_hint_needs_student_features():
    case = make_case("hint", 4, 10, 0)
    with pytest.raises(InvalidTargetsError, match="student_features"):
        case["method"](case["zs"], case["y"], case["targets"])


# ---------------------------------------------------------------------------------------
# Registry and errors
# ---------------------------------------------------------------------------------------
def test_build_errors_are_clear():
    with pytest.raises(SpecError, match="unknown method 'kdd'; choose one of"):
        build_method("kdd")
    with pytest.raises(SpecError, match="no hyperparameter"):
        build_method("kd", alpha=0.5)
    with pytest.raises(SpecError, match="temperature"):
        build_method("kd", temperature=0)
    with pytest.raises(SpecError, match="classifier weight"):
        build_method("kd-sim")
    with pytest.raises(SpecError, match="student_feature_shape"):
        build_method("hint", teacher_feature_shape=4)
    with pytest.raises(SpecError, match="mode"):
        build_method("hint", mode="fitnets", student_feature_shape=4, teacher_feature_shape=4)
    with pytest.raises(SpecError, match="epsilon"):
        build_method("ls", epsilon=1.5)
    # store constants are accepted (and ignored) by every method
    for name in ("ce", "ls", "kd", "kd-topk", "kd-pt"):
        build_method(name, **{c: None for c in STORE_CONSTANTS})


def test_call_errors_are_clear():
    case = make_case("kd", 4, 10, 0)
    m, zs, y, t = case["method"], case["zs"], case["y"], case["targets"]
    with pytest.raises(InvalidTargetsError, match=r"needs store field\(s\) \['logsumexp'\]"):
        m(zs, y, {k: v for k, v in t.items() if k != "logsumexp"})
    with pytest.raises(InvalidTargetsError, match="column for T=4"):
        m(zs, y, {**t, "logsumexp": t["logsumexp"][:, None].expand(4, 3)})
    with pytest.raises(InvalidTargetsError, match="store has 10"):
        m(torch.randn(4, 11), y, t)
    with pytest.raises(InvalidTargetsError, match="out of range"):
        m(zs, torch.tensor([0, 1, 2, 10]), t)
    with pytest.raises(SpecError, match="stages"):
        m(zs, y, t, stage="hint")


# ---------------------------------------------------------------------------------------
# Hot path: the KD loss on prepared/sparse targets gives the numbers of the plain graph
# ---------------------------------------------------------------------------------------
def graph_kd(method, zs, y, targets):
    """Total, components and gradient of a KD-family method the slow way: its public
    ``teacher_distribution`` and the plain-graph kl_divergence / cross_entropy."""
    zs = zs.detach().requires_grad_(True)
    p = method.teacher_distribution(y, targets, zs.shape[-1]).detach()
    T = method.temperature
    kd = T * T * kl_divergence(zs, p, T)
    total = method.kd_weight * kd
    comps = {"kd": kd.detach()}
    if y is not None:
        ce = cross_entropy(zs, y)
        total = total + method.ce_weight * ce
        comps["ce"] = ce.detach()
    (grad,) = torch.autograd.grad(total, zs)
    return total.detach(), comps, grad


KD_FAMILY = [("kd", {}), ("kd-topk", {"k": 4}), ("kd-topk", {}), ("kd-pt", {}), ("kd-sim", {"rho": 2.0}),
             ("kd-pt+sim", {})]


@pytest.mark.parametrize("name,hp", KD_FAMILY)
@pytest.mark.parametrize("B,C", [(8, 10), (16, 100)])
@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16])
def test_fast_path_matches_plain_graph(name, hp, B, C, T, value_dtype):
    case = make_case(name, B, C, 11, value_dtype=value_dtype, temperature=T, **hp)
    m, y, t = case["method"], case["y"], case["targets"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_total, ref_comps, ref_grad = graph_kd(m, case["zs"], y, t)
        out = m(case["zs"], y, t)
    assert m._use_fast_target  # every built-in KD method has its fast (and preparable) target
    assert out.total.item() == pytest.approx(ref_total.item(), rel=2e-6, abs=1e-6)
    assert set(out.components) == set(ref_comps)
    for key, value in out.components.items():
        assert value.item() == pytest.approx(ref_comps[key].item(), rel=2e-6, abs=1e-6)
    out.total.backward()
    torch.testing.assert_close(case["zs"].grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("labels", ["mixed", "none", "all-unlabelled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fast_path_labels_and_dtypes(labels, dtype):
    case = make_case("kd", 8, 10, 12)
    m, t = case["method"], case["targets"]
    y = {"mixed": torch.tensor([3, -1, 7, -1, 0, 9, -1, 2]), "none": None,
         "all-unlabelled": torch.full((8,), -1)}[labels]
    zs = case["zs"].detach().to(dtype).requires_grad_(True)
    ref_total, ref_comps, ref_grad = graph_kd(m, zs, y, t)
    out = m(zs, y, t)
    assert out.total.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rel = 2e-6  # the store's targets are float32 whatever the logits' dtype
    assert out.total.item() == pytest.approx(ref_total.item(), rel=rel, abs=rel)
    assert {k: v.item() for k, v in out.components.items()} == pytest.approx(
        {k: v.item() for k, v in ref_comps.items()}, rel=rel, abs=rel
    )
    out.total.backward()
    assert zs.grad.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(zs.grad.double(), ref_grad.double(), rtol=tol, atol=tol * 1e-2)


def test_sparse_targets_are_the_targets_module_distributions():
    """The sparse forms used on the hot path rebuild exactly what softlabels.targets gives:
    bit for bit for k < C and KD-pt (same operations), to float32 rounding for k == C
    (computed as log_softmax of the values, the same distribution whatever lse holds)."""
    from softlabels.losses import _topk_target
    from softlabels.targets import ground_truth_distribution, topk_distribution

    for value_dtype in (torch.float32, torch.float16):
        for k in (1, 3, 9, 12):
            case = make_case("kd-topk", 8, 12, 13, k=k, value_dtype=value_dtype, temperature=2.0)
            t = case["targets"]
            expected = topk_distribution(t["topk_values"], t["topk_indices"], t["logsumexp"], 2.0, 12)
            sparse = _topk_target(t, 2.0, 12)
            got = sparse.dense(12, torch.float32)
            if k < 12:
                assert torch.equal(got, expected)
                logs = torch.log(sparse.probs)
                torch.testing.assert_close(sparse.log_probs, logs, rtol=1e-5, atol=1e-6)
            else:
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(sparse.log_probs, torch.log(expected), rtol=1e-5, atol=1e-5)
    case = make_case("kd-pt", 8, 10, 14, temperature=2.0)
    m, y, t = case["method"], case["y"], case["targets"]
    sparse = m.target(y, t, 10)
    assert torch.equal(sparse.dense(10, torch.float32),
                       ground_truth_distribution(t["label_logit"], t["logsumexp"], y, 2.0, 10))


def test_kd_zero_probs_inf_logits_and_nan():
    """0 log 0 = 0 where the student's log-probability is -inf (the masked sum is then taken),
    gradients finite; a NaN student logit is not hidden."""
    zs = torch.tensor([[5.0, -1e4, 0.0, -math.inf], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]])
    y = torch.tensor([0, 1])
    out = kd_loss(zs, p, y, temperature=2.0)
    ref = 0.9 * 4.0 * ref_kl(zs.detach(), p, 2.0) + 0.1 * ref_ce(zs.detach(), y)
    assert torch.isfinite(out.total) and out.total.item() == pytest.approx(ref.item(), rel=1e-6)
    (g,) = torch.autograd.grad(out.total, zs)
    assert torch.isfinite(g).all()
    nan = zs.detach().clone()
    nan[1, 2] = math.nan
    assert torch.isnan(kd_loss(nan, p, None).total)


def test_kd_unnormalised_dense_target_gradient():
    """kd_loss differentiates the formula it evaluates, also for a target that does not sum to 1."""
    g = torch.Generator().manual_seed(15)
    zs = torch.randn(6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    p = 0.7 * ref_softmax(torch.randn(6, 7, generator=g, dtype=torch.float64))
    y = torch.randint(0, 7, (6,), generator=g)
    (got,) = torch.autograd.grad(kd_loss(zs, p, y, temperature=3.0).total, zs)
    ref = 0.9 * 9.0 * kl_divergence(zs, p, 3.0) + 0.1 * cross_entropy(zs, y)
    (expected,) = torch.autograd.grad(ref, zs)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["kd", "kd-pt", "kd-sim"])
def test_kd_double_backward(name):
    """create_graph=True: Hessian-vector products are exact."""
    case = make_case(name, 6, 10, 16)
    m, y, t = case["method"], case["y"], case["targets"]
    zs = case["zs"].detach().double().requires_grad_(True)
    v = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def hvp(loss):
        (g,) = torch.autograd.grad(loss, zs, create_graph=True)
        return torch.autograd.grad((g * v).sum(), zs)[0]

    p = m.teacher_distribution(y, t, 10).double()
    ref = m.kd_weight * 16.0 * kl_divergence(zs, p, 4.0) + m.ce_weight * cross_entropy(zs, y)
    torch.testing.assert_close(hvp(m(zs, y, t).total), hvp(ref), rtol=1e-6, atol=1e-9)


def test_kd_subclass_overriding_teacher_distribution_is_honoured():
    from softlabels.losses import KDMethod

    class Sharper(KDMethod):  # a user's own target: the built-in fast target must not shadow it
        def teacher_distribution(self, labels, targets, num_classes):
            return torch.softmax(2 * torch.log(super().teacher_distribution(labels, targets, num_classes)), -1)

    case = make_case("kd", 8, 10, 17)
    m = Sharper(num_classes=10)
    assert not m._use_fast_target and case["method"]._use_fast_target
    out = m(case["zs"], case["y"], case["targets"])
    p = m.teacher_distribution(case["y"], case["targets"], 10)
    ref = kd_loss(case["zs"].detach(), p, case["y"]).total
    assert out.total.item() == pytest.approx(ref.item(), rel=1e-6)


def test_kd_loss_learnable_teacher_gets_gradient():
    zs = torch.randn(4, 5, requires_grad=True)
    teacher_logits = torch.randn(4, 5, requires_grad=True)
    out = kd_loss(zs, torch.softmax(teacher_logits / 4.0, -1), torch.tensor([0, 1, 2, 3]))
    out.total.backward()
    assert teacher_logits.grad is not None and teacher_logits.grad.abs().sum() > 0


def test_label_check_policy_and_no_host_sync_off_cpu():
    """On the CPU the labels are checked every batch; off the CPU only the first batch is
    (a min/max read-back is a device sync) unless check_labels='always'. Meta tensors have no
    data, so any host read would raise: the hot path after the first batch reads nothing."""
    m = build_method("kd", num_classes=10)
    cpu = torch.tensor([1, 2])
    meta = torch.zeros(4, dtype=torch.long, device="meta")
    assert m._should_check_labels(cpu) and m._should_check_labels(meta)
    m._labels_checked = True  # as after a first accelerator batch that passed
    assert m._should_check_labels(cpu) and not m._should_check_labels(meta)
    m.check_labels = "always"
    assert m._should_check_labels(meta)
    m.check_labels = "sometimes"
    with pytest.raises(SpecError, match="check_labels"):
        m._should_check_labels(cpu)
    for name, k in (("ce", 10), ("kd", 10), ("kd-topk", 3), ("kd-pt", 10)):
        m = build_method(name, num_classes=10, **({"k": 3} if name == "kd-topk" else {}))
        m._labels_checked = True
        z = torch.empty(4, 10, device="meta", requires_grad=True)
        t = {"topk_values": torch.empty(4, k, dtype=torch.float16, device="meta"),
             "topk_indices": torch.zeros(4, k, dtype=torch.long, device="meta"),
             "logsumexp": torch.empty(4, device="meta"), "label_logit": torch.empty(4, device="meta")}
        out = m(z, meta, {key: v for key, v in t.items() if key in m.needs})
        out.total.backward()
        assert z.grad.shape == (4, 10) and out.total.device.type == "meta"


def test_fast_path_when_the_tail_mass_rounds_to_zero():
    """A confident teacher with k < C: the tail mass underflows (fill = 0, log fill = -inf), the
    0 log 0 tail term is 0 and everything matches the plain graph."""
    case = make_case("kd-topk", 8, 12, 18, k=3, temperature=1.0)
    zt = case["zt"].clone()
    zt[:, 0] += 80.0
    s = summarize_logits(zt, k=3, temperatures=TEMPS, labels=case["y"])
    t = {"topk_values": s["topk_values"], "topk_indices": s["topk_indices"], "logsumexp": s["logsumexp"][:, 0]}
    m = case["method"]
    assert (m.target(case["y"], t, 12).fill == 0).all()
    ref_total, ref_comps, ref_grad = graph_kd(m, case["zs"], case["y"], t)
    out = m(case["zs"], case["y"], t)
    assert torch.isfinite(out.total) and out.total.item() == pytest.approx(ref_total.item(), rel=2e-6)
    out.total.backward()
    torch.testing.assert_close(case["zs"].grad, ref_grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Prepared (loss-ready) rows: the same loss as the raw fields, computed once per row
# ---------------------------------------------------------------------------------------
def prepared_batch(method, targets, y, rows):
    """Prepare every row of ``targets`` once, then select ``rows`` (what a dataset does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = method.prepare_rows({k: v for k, v in targets.items() if k in method.needs}, y)
    return {k: v[rows] for k, v in prepared.items()}


# unlabelled rows only for the methods that accept them (the others refuse them, tested above)
PREPARED_CASES = [(n, hp, lab) for n, hp in KD_FAMILY for lab in ("all", "mixed", "none")
                  if lab == "all" or n in ("kd", "kd-topk")]


@pytest.mark.parametrize("name,hp,labels", PREPARED_CASES)
@pytest.mark.parametrize("dense", [True, False])
def test_prepared_rows_equal_raw_fields(monkeypatch, name, hp, dense, labels):
    """Values, components and gradients from prepared rows equal those of the raw-fields call
    (dense [N, C] rows, or the sparse form when dense ones would not fit) and the dense
    reference; for kd-topk with k < C and k == C, kd-pt, kd-sim, kd-pt+sim, unlabelled rows."""
    import softlabels.losses.kd as losses

    if not dense:
        monkeypatch.setattr(losses, "PREPARED_DENSE_BYTES", 0)
    case = make_case(name, 24, 10, 21, value_dtype=torch.float16, **hp)
    m, y, t = case["method"], case["y"], case["targets"]
    if labels == "mixed":
        y = y.clone()
        y[::3] = -1
    rows = torch.tensor([5, 0, 23, 7, 7, 12, 3, 19])
    sparse_by_nature = name == "kd-pt" or hp.get("k", 10) < 10  # k == C top-k, sim targets are dense
    if not dense and not sparse_by_nature:  # dense rows over the budget: prepared per batch instead
        assert m.prepare_rows(t, y) is None
        return
    prepared = prepared_batch(m, t, None if labels == "none" else y, rows)
    assert prepared and all(k.startswith(m.prepared_prefix) for k in prepared)
    assert m.prepared_prefix.startswith("prepared/" + m.name + ",")
    assert (m.prepared_prefix + "index" in prepared) == (not dense)
    y_batch = None if labels == "none" else y[rows]
    raw = {k: v[rows] for k, v in t.items()}
    zs = case["zs"].detach()[rows]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_total, ref_comps, ref_grad = graph_kd(m, zs, y_batch, raw)
        z_raw = zs.clone().requires_grad_(True)
        out_raw = m(z_raw, y_batch, raw)
    z_prep = zs.clone().requires_grad_(True)
    out = m(z_prep, y_batch, prepared)
    assert out.total.item() == pytest.approx(out_raw.total.item(), rel=2e-6, abs=1e-6)
    assert out.total.item() == pytest.approx(ref_total.item(), rel=2e-6, abs=1e-6)
    assert set(out.components) == set(out_raw.components) == set(ref_comps)
    for key, value in out.components.items():
        assert value.item() == pytest.approx(out_raw.components[key].item(), rel=2e-6, abs=1e-6)
    out.total.backward()
    out_raw.total.backward()
    torch.testing.assert_close(z_prep.grad, z_raw.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z_prep.grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_prepared_rows_full_k_equal_dense_teacher_kd():
    """KD from prepared rows of a full-k store equals KD against the dense teacher softmax."""
    case = make_case("kd", 16, 12, 22)
    m, y = case["method"], case["y"]
    rows = torch.arange(16).flip(0)
    prepared = prepared_batch(m, case["targets"], None, rows)
    assert set(prepared) == {m.prepared_prefix + "probs", m.prepared_prefix + "log_probs"}  # dense
    zs = case["zs"].detach()[rows].requires_grad_(True)
    out = m(zs, y[rows], prepared)
    ref = ref_kd(zs.detach(), ref_softmax(case["zt"][rows] / 4.0), y[rows], 4.0, 0.1, 0.9)
    assert out.total.item() == pytest.approx(ref.item(), rel=1e-5)
    out.total.backward()
    zr = zs.detach().double().requires_grad_(True)
    ref_kd(zr, ref_softmax(case["zt"][rows] / 4.0), y[rows], 4.0, 0.1, 0.9).backward()
    torch.testing.assert_close(zs.grad.double(), zr.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,hp", [("kd", {}), ("kd-pt", {}), ("kd-topk", {"k": 3})])
def test_prepared_rows_empty_batch_and_double_backward(name, hp):
    case = make_case(name, 6, 10, 23, **hp)
    m, y = case["method"], case["y"]
    empty = prepared_batch(m, case["targets"], y, torch.arange(0))
    z = torch.zeros(0, 10, requires_grad=True)
    out = m(z, y[:0], empty)
    assert out.total.item() == 0.0
    out.total.backward()
    assert z.grad.shape == (0, 10)
    prepared = prepared_batch(m, case["targets"], y, torch.arange(6))
    zs = case["zs"].detach().double().requires_grad_(True)
    v = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def hvp(loss):
        (g,) = torch.autograd.grad(loss, zs, create_graph=True)
        return torch.autograd.grad((g * v).sum(), zs)[0]

    p = m.teacher_distribution(y, case["targets"], 10).double()
    ref = m.kd_weight * 16.0 * kl_divergence(zs, p, 4.0) + m.ce_weight * cross_entropy(zs, y)
    torch.testing.assert_close(hvp(m(zs, y, prepared).total), hvp(ref), rtol=1e-6, atol=1e-9)


def test_prepared_rows_errors_and_declines():
    case = make_case("kd", 4, 10, 24)
    m, y, t = case["method"], case["y"], case["targets"]
    prepared = prepared_batch(m, t, None, torch.arange(4))
    other = build_method("kd", temperature=2.0, num_classes=10)
    with pytest.raises(InvalidTargetsError, match=r"prepared for 'prepared/kd,temperature=4.0,num_classes=10'"):
        other(case["zs"], y, prepared)
    with pytest.raises(InvalidTargetsError, match="rows, the batch has 3"):
        m(case["zs"][:3], y[:3], prepared)
    with pytest.raises(InvalidTargetsError, match="out of range"):  # labels are still checked per batch
        m(case["zs"], torch.tensor([0, 1, 2, 10]), prepared)
    # no prepared form: label-only methods, hints, a subclass with its own target, unknown C
    assert build_method("ce", num_classes=10).prepare_rows({}, y) is None
    assert build_method("kd", temperature=4.0).prepare_rows(t, None) is None

    class Sharper(type(m)):
        def teacher_distribution(self, labels, targets, num_classes):
            return super().teacher_distribution(labels, targets, num_classes) ** 2

    assert Sharper(num_classes=10).prepare_rows(t, None) is None and Sharper(num_classes=10).prepared_prefix is None


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_gradient_scaled_and_retained_graph(T):
    """An incoming gradient != 1 scales the gradient, and a second backward through a retained
    graph (accumulating into the first one) is still exact."""
    case = make_case("kd-topk", 8, 10, 25, k=4, temperature=T)
    m, y, t = case["method"], case["y"], case["targets"]
    _, _, ref_grad = graph_kd(m, case["zs"], y, t)
    zs = case["zs"].detach().requires_grad_(True)
    out = m(zs, y, t)
    (-2.5 * out.total).backward(retain_graph=True)
    torch.testing.assert_close(zs.grad, -2.5 * ref_grad, rtol=1e-5, atol=1e-7)
    out.total.backward()
    torch.testing.assert_close(zs.grad, -1.5 * ref_grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # no gradient wanted: none is computed, the loss is the same
        assert m(zs, y, t).total.item() == pytest.approx(out.total.item(), rel=1e-7)
