"""The mathematics of language models, as functions tested against autodiff or closed forms.

The engine (model, data, training loop, sharding, checkpoints) lives one level up in `llm_math`;
each module here is one topic: derivatives, information, gradient noise, sharpness, attention
spectra, compression, LoRA, distillation, n-grams, sampling, scaling laws, embeddings, optimizers.
"""
