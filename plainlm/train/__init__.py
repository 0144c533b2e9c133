"""Training small transformers from scratch (numpy forward/backward pairs); see README.md here."""
