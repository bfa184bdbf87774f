"""``python -m mfm_jax.study``: see ``mfm_jax/study/cli.py``."""

if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  from mfm_jax.study import cli  # pylint: disable=g-import-not-at-top
  cli.define_flags()
  app.run(cli.main)
