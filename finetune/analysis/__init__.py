"""What a trained network's outputs show: report metrics and figures (`reports`), Grad-CAM (`cam`)."""
