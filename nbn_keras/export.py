"""Exports a `.keras` model for TF Serving: `python -m nbn_keras.export`.

    python -m nbn_keras.export --model=run/model.keras --base_dir=serving

See `nbn_keras.serving.export`.
"""

from absl import app

from nbn_keras.serving import export

if __name__ == "__main__":
    export.define_flags()
    app.run(export.main)
