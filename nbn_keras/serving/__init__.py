"""TF Serving export: in-graph image decoding, signatures and version directories.

`export_for_serving(model, base_dir, model_name)` writes a folded model as
version `<base_dir>/<model_name>/<n>/`; `export_keras_file(path)` does the
same for a `.keras` file (`python -m nbn_keras.export`). See
`nbn_keras.serving.export`.
"""

from nbn_keras.serving.export import export_for_serving
from nbn_keras.serving.export import export_keras_file
