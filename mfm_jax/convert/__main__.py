r"""``python -m mfm_jax.convert``: PyTorch ``.pth`` / ``.safetensors`` ⇄ Orbax checkpoint.

  python -m mfm_jax.convert --input=mit_b5.pth --output=ckpt/mit_b5 [--arch=auto]
  python -m mfm_jax.convert --input=model.safetensors --output=ckpt/mit_b5 --arch=mit_b5
  python -m mfm_jax.convert --input=latest.pth --output=ckpt/daformer --which=teacher
  python -m mfm_jax.convert --to_torch --input=ckpt/daformer --output=daformer.pth
  python -m mfm_jax.convert --input=rebuilder.pth --output=ckpt/rebuilder --arch=rebuilder_daformer
  python -m mfm_jax.convert --to_torch --input=ckpt/daformer --output=daformer.safetensors

``--arch`` is 'auto' (detected from key names) or one of ``mapping.ARCHS``. Checksums printed by
both directions are over the same Flax variables, so a round trip can be compared by eye.
Unreadable, unsafe (pickled code) or mismatching files print one line and exit 1
(``--verbose`` adds the traceback).
"""

from absl import app
from absl import flags

from mfm_jax.convert import cli
from mfm_jax.convert import mapping
from mfm_jax.convert import rebuilder_mapping
from mfm_jax.runtime import errors

_INPUT = flags.DEFINE_string("input", None, ".pth / .safetensors file, or an Orbax directory "
                             "with --to_torch.")
_OUTPUT = flags.DEFINE_string("output", None, "Orbax directory, or a .pth / .safetensors file "
                              "with --to_torch.")
_ARCH = flags.DEFINE_enum("arch", "auto", ("auto",) + mapping.ARCHS + rebuilder_mapping.ARCHS,
                          "Architecture; rebuilder_daformer|rebuilder_dlv2 = the released MFM "
                          "Rebuilder (Wenlve-Zhou/MRM rebuilder.py).")
_WHICH = flags.DEFINE_enum("which", "student", ("student", "teacher", "imnet"),
                           "UDA network: model. (student), ema_model. (teacher), imnet_model.")
_TO_TORCH = flags.DEFINE_bool("to_torch", False, "Export an Orbax checkpoint to a .pth (or "
                               ".safetensors) file.")
_PREFIX = flags.DEFINE_string("prefix", "", "Prefix for exported torch keys, e.g. 'model.'.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output.")
_GRID = flags.DEFINE_integer("grid", 16, "Rebuilder export: token grid of the written "
                             "transformer.pos_embed (the release: 16).")
flags.mark_flags_as_required(["input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _TO_TORCH.value:
    report = cli.export_to_torch(_INPUT.value, _OUTPUT.value, _ARCH.value, _WHICH.value,
                                 _PREFIX.value, _OVERWRITE.value, _GRID.value)
  else:
    report = cli.convert_to_orbax(_INPUT.value, _OUTPUT.value, _ARCH.value, _WHICH.value,
                                  _OVERWRITE.value)
  print(cli.format_report(report), flush=True)


if __name__ == "__main__":
  errors.run(main)
