"""What every flow-matching adapter shares (SD3 and the flow lab): the Euler sampler the tracked pass
steps with, and the members of ``diffmem.model.DiffusionModel`` that follow from rectified flow,
x_sigma = (1 - sigma) x0 + sigma eps with the velocity v = eps - x0 as the denoiser's output.
Timesteps are sigma * num_train_timesteps, as diffusers' ``FlowMatchEulerDiscreteScheduler`` keeps them.
"""

from __future__ import annotations

import torch

from diffmem.model import Conditioning, noise_from_flow_velocity, training_target


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                    max_shift: float) -> float:
    """mu of the resolution-dependent shift: linear in the number of image tokens (the SD3/FLUX pipelines')."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def sigma_of_snr(snr: float) -> float:
    """The flow sigma whose signal-to-noise ratio ((1 - sigma) / sigma)^2 is `snr` (x_sigma = (1 - sigma) x0 +
    sigma eps): 1 / (1 + sqrt(snr))."""
    if snr < 0:
        raise ValueError(f"snr {snr}: a signal-to-noise ratio is >= 0")
    return 1.0 / (1.0 + snr ** 0.5)


def _sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                         set_alpha_to_one=False, clip_sample=False)


def sd_sigma_at(t: float) -> float:
    """The flow sigma with the SNR of Stable Diffusion 1.x/2.x's timestep `t` (scaled-linear betas 0.00085
    to 0.012 over 1,000 steps; SNR = alpha_bar / (1 - alpha_bar)): where a noise level published on SD's
    timestep scale sits on a flow model (t = 500: 0.618)."""
    alpha_bar = float(_sd_scheduler().alphas_cumprod[int(round(t))])
    return sigma_of_snr(alpha_bar / (1 - alpha_bar))


def sd_first_step_sigma(num_inference_steps: int = 50) -> float:
    """The flow sigma at the SNR of SD's first DDIM step (steps_offset 1: t = 981 at 50 steps): 0.929 at
    50 steps. Where Wen et al. measure on SD, as a noise level a flow model can be asked at."""
    sd = _sd_scheduler()
    sd.set_timesteps(num_inference_steps)
    return sd_sigma_at(int(sd.timesteps[0]))


_SAMPLER = None


def flow_match_sampler_class():
    """``FlowMatchSampler``: diffusers' ``FlowMatchEulerDiscreteScheduler`` with the members the tracked
    pass uses on every family (made on first use: diffusers is imported lazily)."""
    global _SAMPLER
    if _SAMPLER is not None:
        return _SAMPLER
    from diffusers import FlowMatchEulerDiscreteScheduler

    class FlowMatchSampler(FlowMatchEulerDiscreteScheduler):
        """The family's Euler scheduler. x_T ~ N(0, I) enters unscaled (``init_noise_sigma`` 1,
        ``scale_model_input`` the identity); ``step`` finds its place in the schedule from the timestep
        on every call (a pass may start in the middle of a schedule or stop early) and is deterministic
        (eta 0); ``set_timesteps`` supplies mu for dynamic shifting from ``image_seq_len``, as the
        pipeline does."""

        init_noise_sigma = 1.0
        image_seq_len: int = 4096  # image tokens of one latent (set by the adapter)

        def scale_model_input(self, sample, timestep=None):
            return sample

        linspace_sigmas: bool = False  # FLUX's pipeline: sigmas linspace(1, 1/N, N) before the shift

        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
            if self.linspace_sigmas and sigmas is None and timesteps is None:
                import numpy as np

                sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
            if self.config.use_dynamic_shifting and mu is None:
                c = self.config
                mu = calculate_shift(self.image_seq_len, c.get("base_image_seq_len", 256),
                                     c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                     c.get("max_shift", 1.16))
            super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)

        def sigma_of(self, timestep) -> float:
            """sigma of a timestep of the current schedule."""
            return float(self.sigmas[self.index_for_timestep(torch.as_tensor(timestep).to(self.timesteps.device))])

        def step(self, model_output, timestep, sample, eta: float = 0.0, return_dict: bool = True, **kwargs):
            if eta:
                raise ValueError(f"--eta {eta}: the flow-matching Euler sampler is deterministic (eta 0)")
            self._step_index = None  # from the timestep, not from the previous call
            return super().step(model_output, timestep, sample, return_dict=return_dict, **kwargs)

    _SAMPLER = FlowMatchSampler
    return _SAMPLER


def flow_sampling_scheduler(config: dict, image_seq_len: int):
    """A ``FlowMatchSampler`` from a ``FlowMatchEulerDiscreteScheduler`` config (its shift kept);
    `image_seq_len`, the image tokens of one latent, sets mu where the config shifts dynamically."""
    if config.get("stochastic_sampling", False):
        raise ValueError("the scheduler config sets stochastic_sampling; diffmem's pass samples deterministically")
    scheduler = flow_match_sampler_class().from_config(config)
    scheduler.image_seq_len = image_seq_len
    return scheduler


class FlowMatching:
    """Mixin (before ``AdapterBase``) for an adapter whose denoiser outputs the flow velocity; it needs
    ``model_output``, ``scheduler`` (a ``FlowMatchSampler``), ``device``, ``family`` and ``name``."""

    prediction_type = "flow"

    def predict(self, x_t, t, cond: Conditioning, denoiser=None) -> torch.Tensor:
        """The velocity: what guidance combines and the Euler step takes (as in the SD3 pipeline)."""
        return self.model_output(x_t, t, cond, denoiser)

    def sigma(self, t) -> torch.Tensor:
        """sigma of timestep(s) t: t / num_train_timesteps (the scheduler's timesteps are sigma * 1000)."""
        return torch.as_tensor(t, device=self.device, dtype=torch.float32) / self.scheduler.config.num_train_timesteps

    def output_to_noise(self, output, x_t, t) -> torch.Tensor:
        """eps = x_t + (1 - sigma) v; refused at sigma = 1, where it is x_t whatever the prompt."""
        return noise_from_flow_velocity(output, x_t, self.sigma(t)).to(output.dtype)

    def training_target(self, x0, noise, t) -> torch.Tensor:
        return training_target(x0, noise, None, "flow")

    def alpha_bar(self, t):
        raise ValueError(f"{self.family} ({self.name}) is a flow-matching model: it has no alpha_bar "
                         "(x_sigma = (1 - sigma) x0 + sigma eps)")

    def training_scheduler(self):
        """The model's flow scheduler: training reads its ``num_train_timesteps`` and noises with
        ``diffmem.train.flow_noised`` at uniformly drawn sigma."""
        return self.scheduler
