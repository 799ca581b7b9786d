"""The 2019 temporal concept localization task: segment fine-tuning, candidate scoring, retrieval."""
