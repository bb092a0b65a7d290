"""What a person reads: the HTML report, its plots, Grad-CAM explanations."""
