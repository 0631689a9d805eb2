"""PyTorch reference models for useg: the formulation of LeeJunHyun/Image_Segmentation network.py
(U_Net, AttU_Net, R2U_Net, R2AttU_Net), generalized to any base width, depth and recurrence t, with
an optional transposed-conv up-conv. With width=64, depth=4, up='upsample' the modules, parameter
names and shapes are exactly those of network.py, so state_dict keys match useg's parameter names.

Used by the parity tests (tests/pytorch/) and by benchmarks/compare_pytorch.py.
"""
import torch
import torch.nn as nn


class conv_block(nn.Module):
    def __init__(self, ch_in, ch_out):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(ch_in, ch_out, kernel_size=3, stride=1, padding=1, bias=True),
            nn.BatchNorm2d(ch_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch_out, ch_out, kernel_size=3, stride=1, padding=1, bias=True),
            nn.BatchNorm2d(ch_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.conv(x)


class up_conv(nn.Module):
    """Default: nearest x2 upsample + conv3x3 + BN + ReLU (names up.1, up.2).
    transpose=True: a plain ConvTranspose2d(k=2, s=2) registered as `up` (names up.weight, up.bias)."""

    def __init__(self, ch_in, ch_out, transpose=False):
        super().__init__()
        if transpose:
            self.up = nn.ConvTranspose2d(ch_in, ch_out, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2),
                nn.Conv2d(ch_in, ch_out, kernel_size=3, stride=1, padding=1, bias=True),
                nn.BatchNorm2d(ch_out),
                nn.ReLU(inplace=True),
            )

    def forward(self, x):
        return self.up(x)


class Recurrent_block(nn.Module):
    def __init__(self, ch_out, t=2):
        super().__init__()
        self.t = t
        self.ch_out = ch_out
        self.conv = nn.Sequential(
            nn.Conv2d(ch_out, ch_out, kernel_size=3, stride=1, padding=1, bias=True),
            nn.BatchNorm2d(ch_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        for i in range(self.t):
            if i == 0:
                x1 = self.conv(x)
            x1 = self.conv(x + x1)
        return x1


class RRCNN_block(nn.Module):
    def __init__(self, ch_in, ch_out, t=2):
        super().__init__()
        self.RCNN = nn.Sequential(Recurrent_block(ch_out, t=t), Recurrent_block(ch_out, t=t))
        self.Conv_1x1 = nn.Conv2d(ch_in, ch_out, kernel_size=1, stride=1, padding=0)

    def forward(self, x):
        x = self.Conv_1x1(x)
        x1 = self.RCNN(x)
        return x + x1


class Attention_block(nn.Module):
    def __init__(self, F_g, F_l, F_int):
        super().__init__()
        self.W_g = nn.Sequential(nn.Conv2d(F_g, F_int, kernel_size=1, stride=1, padding=0, bias=True), nn.BatchNorm2d(F_int))
        self.W_x = nn.Sequential(nn.Conv2d(F_l, F_int, kernel_size=1, stride=1, padding=0, bias=True), nn.BatchNorm2d(F_int))
        self.psi = nn.Sequential(nn.Conv2d(F_int, 1, kernel_size=1, stride=1, padding=0, bias=True), nn.BatchNorm2d(1), nn.Sigmoid())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, g, x):
        g1 = self.W_g(g)
        x1 = self.W_x(x)
        psi = self.relu(g1 + x1)
        psi = self.psi(psi)
        return x * psi


class _UNetFamily(nn.Module):
    """Generalized skeleton; modules are registered in network.py's order:
    Enc1..Enc{depth+1}, then for each level from the bottom: Up{i}, [Att{i}], Dec{i}; then Conv_1x1."""

    recurrent = False
    attention = False

    def __init__(self, img_ch=3, output_ch=1, t=2, width=64, depth=4, up="upsample"):
        super().__init__()
        assert up in ("upsample", "transpose")
        self.depth = depth
        w = [width * 2 ** i for i in range(depth + 1)]
        self.Maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        if self.recurrent:
            self.Upsample = nn.Upsample(scale_factor=2)  # present (unused) in network.py's R2 models
        enc_name, dec_name = ("RRCNN", "Up_RRCNN") if self.recurrent else ("Conv", "Up_conv")

        def block(cin, cout):
            return RRCNN_block(cin, cout, t=t) if self.recurrent else conv_block(cin, cout)

        for i in range(depth + 1):
            setattr(self, f"{enc_name}{i + 1}", block(img_ch if i == 0 else w[i - 1], w[i]))
        for i in range(depth, 0, -1):
            setattr(self, f"Up{i + 1}", up_conv(w[i], w[i - 1], transpose=(up == "transpose")))
            if self.attention:
                setattr(self, f"Att{i + 1}", Attention_block(F_g=w[i - 1], F_l=w[i - 1], F_int=w[i - 1] // 2))
            setattr(self, f"{dec_name}{i + 1}", block(2 * w[i - 1], w[i - 1]))
        self.Conv_1x1 = nn.Conv2d(w[0], output_ch, kernel_size=1, stride=1, padding=0)
        self._enc, self._dec = enc_name, dec_name

    def forward(self, x):
        skips = []
        for i in range(self.depth + 1):
            if i > 0:
                x = self.Maxpool(x)
            x = getattr(self, f"{self._enc}{i + 1}")(x)
            skips.append(x)
        d = skips[-1]
        for i in range(self.depth, 0, -1):
            u = getattr(self, f"Up{i + 1}")(d)
            s = skips[i - 1]
            if self.attention:
                s = getattr(self, f"Att{i + 1}")(g=u, x=s)
            d = getattr(self, f"{self._dec}{i + 1}")(torch.cat((s, u), dim=1))
        return self.Conv_1x1(d)


class U_Net(_UNetFamily):
    pass


class AttU_Net(_UNetFamily):
    attention = True


class R2U_Net(_UNetFamily):
    recurrent = True


class R2AttU_Net(_UNetFamily):
    recurrent = True
    attention = True


MODELS = {"unet": U_Net, "attention-unet": AttU_Net, "r2unet": R2U_Net, "ar2unet": R2AttU_Net}


def make(model, in_ch=3, classes=1, width=64, depth=4, t=2, up="upsample"):
    """Build a reference model by useg's name (unet, attention-unet, r2unet, ar2unet)."""
    return MODELS[model](img_ch=in_ch, output_ch=classes, t=t, width=width, depth=depth, up=up)



if __name__ == "__main__":
    # Self-check: at the defaults the state_dict keys are those of network.py.
    m = make("ar2unet")
    keys = list(m.state_dict().keys())
    assert keys[0] == "RRCNN1.RCNN.0.conv.0.weight", keys[0]
    assert "Att5.W_g.0.weight" in keys and "Up_RRCNN2.Conv_1x1.bias" in keys
    u = make("unet")
    print("U_Net parameters:", sum(p.numel() for p in u.parameters()))
    print("R2AttU_Net parameters:", sum(p.numel() for p in m.parameters()))
