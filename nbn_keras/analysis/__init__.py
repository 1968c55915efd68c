"""Reading runs: test figures, pictures of a run, Grad-CAM."""
