"""Whole-slide inference: a trained patch model over slides (OpenSlide), heatmaps, slide metrics."""
