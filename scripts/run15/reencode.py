"""Run 15 prototype: before each student block goes into the KV cache as context, take it through pixels (decode the
clip so far with the VAE, encode it again) so the context stays on the encoder's latent manifold, like the real
clips the student was trained to continue.

Same arguments as `causal-forcing eval model`, plus `--reencode-vae FOLDER` (default: the bundled VAE). The stream's
`next_block` is patched for this process only; the prefix frames are left as they are.
"""
import sys

import torch

from causal_forcing.cli import main
from causal_forcing.models.small_vae import SmallVAE
from causal_forcing.pipelines.streaming import CausalStream

args = sys.argv[1:]
vae_folder = "causal_forcing/assets/shapes_vae"
if "--reencode-vae" in args:
    i = args.index("--reencode-vae")
    vae_folder = args[i + 1]
    del args[i:i + 2]
VAE = SmallVAE.from_folder(vae_folder).eval()
_next = CausalStream.next_block


@torch.no_grad()
def next_block(self):
    prefix = self._prefix is not None or (self.frame == 0 and self.first_frame is not None)
    out = _next(self)
    hist = self.__dict__.setdefault("_hist", [])
    if not prefix and not self.done:
        start = self._pending_commit[1]
        clip = torch.cat(hist + [out], dim=1)
        again = VAE.encode(VAE.decode(clip))[:, -out.shape[1]:].to(out.dtype)
        self._pending_commit = (again, start)
        out = again
    hist.append(out)
    return out


CausalStream.next_block = next_block
sys.exit(main(["eval", "model", *args]))
