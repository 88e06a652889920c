"""Layer 5: samplers and noise processes, tensors in and tensors out, no weights.

Every sampler takes a denoiser callable and a ``torch.Generator`` and returns tensors:

* :mod:`~stgen.sampling.masking` - masked diffusion (HINGE): schedule, forward masking, K-step unmasking;
* :mod:`~stgen.sampling.gaussian` - Gaussian DDPM schedule, ``q_sample`` and DDIM;
* :mod:`~stgen.sampling.vesde` - VE-SDE (FLAG): DSM loss and the Heun probability-flow sampler.
"""
