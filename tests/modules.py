"""Hand-written MLPs whose attribute names match nothing a registry would know."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Swish(nn.Module):
    """A custom activation module (traced through into element-wise ops)."""

    def forward(self, t):
        return t * torch.sigmoid(t)


class ScaledTanh(nn.Module):
    """An activation with a learnable per-feature parameter."""

    def __init__(self, width):
        super().__init__()
        self.alpha = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, t):
        return torch.tanh(t) * self.alpha


class Odd(nn.Module):
    """Gated, operands swapped (``up * act(gate)``), biases everywhere, names ``wa/wb/wo``."""

    def __init__(self, h=12, i=28):
        super().__init__()
        self.wa, self.wb, self.wo = nn.Linear(h, i), nn.Linear(h, i), nn.Linear(i, h)
        self.nonlin = Swish()

    def forward(self, q):
        return self.wo(self.wb(q) * self.nonlin(self.wa(q)) * 1.0)


class FusedUpFirst(nn.Module):
    """Fused projection with the *up* half first, split by slicing, GELU(tanh) on the second half."""

    def __init__(self, h=12, i=20):
        super().__init__()
        self.i = i
        self.both, self.back = nn.Linear(h, 2 * i, bias=False), nn.Linear(i, h, bias=False)

    def forward(self, z):
        uv = self.both(z)
        return self.back(uv[..., : self.i] * F.gelu(uv[..., self.i :], approximate="tanh"))


class FusedSplit(nn.Module):
    """Fused projection split with ``torch.split``, ReLU^2 activation."""

    def __init__(self, h=12, i=16):
        super().__init__()
        self.i = i
        self.p, self.q = nn.Linear(h, 2 * i), nn.Linear(i, h)

    def forward(self, z):
        a, b = torch.split(self.p(z), self.i, dim=-1)
        return self.q(torch.relu(a).pow(2) * b)


class ParamAct(nn.Module):
    """Plain MLP whose activation has a parameter, with a dropout inside."""

    def __init__(self, h=12, i=36, p=0.0):
        super().__init__()
        self.expand, self.act, self.drop, self.squeeze = nn.Linear(h, i), ScaledTanh(i), nn.Dropout(p), nn.Linear(i, h)

    def forward(self, z):
        return self.squeeze(self.drop(self.act(self.expand(z))))


class MyLinear(nn.Linear):
    """An ``nn.Linear`` subclass defined outside torch.nn (traced as a leaf by fxtile's tracer)."""


class Functional(nn.Module):
    """Projections through ``F.linear`` on raw parameters (how some code traces through linears)."""

    def __init__(self, h=12, i=24):
        super().__init__()
        self.g = nn.Parameter(torch.randn(i, h) / h**0.5)
        self.u = nn.Parameter(torch.randn(i, h) / h**0.5)
        self.d = nn.Parameter(torch.randn(h, i) / i**0.5)
        self.db = nn.Parameter(torch.zeros(h))

    def forward(self, z):
        return F.linear(F.silu(F.linear(z, self.g)) * F.linear(z, self.u), self.d, self.db)


class RMS(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(h))

    def forward(self, z):
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class Residual(nn.Module):
    """A residual block with a norm, holding an MLP under an unusual name: traced as one block."""

    def __init__(self, h=12):
        super().__init__()
        self.pre, self.ffwd = RMS(h), Odd(h, 28)
        self.lin = MyLinear(h, h)

    def forward(self, z):
        return self.lin(z + self.ffwd(self.pre(z)))


class Stack(nn.Module):
    """Several residual blocks in a ModuleList plus a fused MLP at the end."""

    def __init__(self, h=12):
        super().__init__()
        self.blocks = nn.ModuleList([Residual(h), Residual(h)])
        self.tail = FusedUpFirst(h)

    def forward(self, z):
        for b in self.blocks:
            z = b(z)
        return self.tail(z)


class Branchy(nn.Module):
    """Data-dependent control flow: cannot be traced by torch.fx."""

    def __init__(self, h=12, i=30):
        super().__init__()
        self.up_a, self.down_a = nn.Linear(h, i), nn.Linear(i, h)

    def forward(self, z):
        if z.sum() > 0:
            return self.down_a(torch.relu(self.up_a(z)))
        return z


class TokenMixer(nn.Module):
    """An MLP-Mixer style block: a gated MLP over the *sequence* axis (after a transpose)."""

    def __init__(self, seq=9, i=20):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(seq, i), nn.Linear(seq, i), nn.Linear(i, seq)

    def forward(self, z):  # z: [batch, seq, hidden]
        t = z.transpose(1, 2)
        return self.c(F.silu(self.a(t)) * self.b(t)).transpose(1, 2)


class Leaky(nn.Module):
    """An intermediate escapes the MLP (returned for an auxiliary loss): cannot be recomputed away."""

    def __init__(self, h=12, i=30):
        super().__init__()
        self.k, self.v, self.o = nn.Linear(h, i), nn.Linear(h, i), nn.Linear(i, h)

    def forward(self, z):
        hidden = F.silu(self.k(z)) * self.v(z)
        return self.o(hidden) + hidden.mean()


class CountingLinear(nn.Linear):
    """A stateful projection: counts the tokens it sees in a buffer (updated in forward)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, z):
        self.seen += z.shape[:-1].numel()
        return super().forward(z)


class Stateful(nn.Module):
    def __init__(self, h=12, i=30):
        super().__init__()
        self.k, self.v, self.o = CountingLinear(h, i), nn.Linear(h, i), nn.Linear(i, h)

    def forward(self, z):
        return self.o(F.silu(self.k(z)) * self.v(z))


class FlatResidual(nn.Module):
    """The MLP's projections are direct children of a residual block with a norm: the region's input
    is the norm's output inside the same graph, and the residual add stays outside the region."""

    def __init__(self, h=12, i=32):
        super().__init__()
        self.norm, self.p1, self.p2, self.p3 = RMS(h), nn.Linear(h, i), nn.Linear(h, i), nn.Linear(i, h)

    def forward(self, z):
        n = self.norm(z)
        return z + self.p3(F.gelu(self.p1(n)) * self.p2(n))


class PlainSwish(nn.Module):
    """A plain MLP whose activation is ``t * sigmoid(t)`` (like CLIP's quick GELU): a ``*`` of two values
    from the same projection is an activation, not a gate."""

    def __init__(self, h=12, i=40, inplace_relu=False):
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(h, i), nn.Linear(i, h)
        self.act = nn.ReLU(inplace=True) if inplace_relu else Swish()

    def forward(self, z):
        return self.fc_out(self.act(self.fc_in(z)))


class FusedPartial(nn.Module):
    """A projection 3x wide of which gate and up read two thirds: not a gate/up split of the whole."""

    def __init__(self, h=12, i=10):
        super().__init__()
        self.i = i
        self.p, self.q = nn.Linear(h, 3 * i), nn.Linear(i, h)

    def forward(self, z):
        y = self.p(z)
        return self.q(F.silu(y[..., : self.i]) * y[..., self.i : 2 * self.i])
