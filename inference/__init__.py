"""Use a trained model: classify new images (predict.py), export it, and serve a demo (demo.py)."""
