"""SPIRAL's policy: a conv-LSTM agent with autoregressive action heads.

The architecture follows DeepMind's released ``spiral/agents/default.py``:

1. **Torso.** The canvas (plus the target image in conditional mode; no canvas in the *blind*
   ablation) and two coordinate channels go through a 5x5 conv. The previous action is
   embedded head by head (a location by its (y, x) coordinates, any other head one-hot), each
   embedding multiplied by that head's mask, concatenated and passed through an MLP; the
   episode's noise sample goes through another MLP. Both vectors are added to every pixel of
   the conv features. A conv encoder brings the map down to 8x8 through residual blocks, and a
   Linear layer maps it to the core width.
2. **Core.** An LSTM carries the episode's history.
3. **Heads.** Actions are sampled one head at a time in the spec's order (``flag`` first).
   Location heads reshape the core vector into a 4x4 map and decode it to GxG logits with a
   transposed-conv decoder; other heads are linear. After each head the chosen value is
   embedded and folded back into the vector the next head reads:
   ``z <- relu(z + MLP[16, 32, core](concat(z, embed(action))))``. So ``control`` knows
   ``end``, colours know the location, and so on.
4. **Value.** A Linear baseline on the core output.

With ``policy.location_skip`` (not in DeepMind's agent) each location head also adds a 1x1
conv of the encoder's 8x8 map, resampled to its grid, to its logits: a spatial shortcut that
lets "paint where the target has ink" skip the LSTM's flat bottleneck. With
``policy.location_features`` (not in DeepMind's agent either) the encoder's features at the
chosen cell are folded into the vector the later heads read, so that "what is there" (a scene
object's colour, say) reaches the colour heads without passing through the core vector.

The sampled ``flag`` decides which heads matter (:meth:`ActionSpec.masks_for`): a move ignores
size, pressure and colour. Every head is still sampled (the environment needs a full action
row), but log-probabilities and entropies are summed only over the heads the mask keeps.

:meth:`SpiralPolicy.forward` either samples (acting) or, given actions, scores them with the
same autoregressive conditioning (teacher forcing, for learning). :meth:`SpiralPolicy.unroll`
scores a whole ``[T, B]`` batch of episodes; it batches the torso and the heads over all T*B
steps and only loops the LSTM, which gives the same numbers as calling ``forward`` T times.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F

from spiral.config import PolicyConfig
from spiral.envs.spec import ActionSpec
from spiral.nets.layers import MLP, ConvDecoder, ConvEncoder, location_coordinates, xy_grids

LSTMState = tuple[torch.Tensor, torch.Tensor]
"""The LSTM's ``(h, c)``, each ``[N, core_dim]``."""

RESIDUAL_MLP_SIZES = (16, 32)
"""Hidden sizes of the per-head residual MLP (DeepMind's; its output is the core width)."""
ENCODED_SIZE = 8
"""Side of the feature map the encoder produces."""
DECODER_INPUT_SIZE = 4
"""Side of the map a location head reshapes the core vector into."""


@dataclass
class PolicyInputs:
    """What the policy sees, as tensors. Leading axes are ``[N]`` (one step) or ``[T, B]``.

    Attributes:
        canvas: ``[..., C, H, W]`` float renders in [0, 1].
        step: ``[...]`` long step index within the episode (not seen by the network; kept for
            diagnostics and losses).
        prev_action: ``[..., K]`` long previous action (zeros after a reset).
        prev_mask: ``[..., K]`` float mask of the previous action (zeros after a reset).
        noise: ``[..., D]`` float per-episode noise sample.
        target: ``[..., C, H, W]`` float target images in [0, 1] (conditional), else None.
    """

    canvas: torch.Tensor
    step: torch.Tensor
    prev_action: torch.Tensor
    prev_mask: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "PolicyInputs":
        """A copy with every tensor on ``device``."""
        return PolicyInputs(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                               for f in fields(self)})

    def flatten_time(self) -> "PolicyInputs":
        """``[T, B, ...]`` fields to ``[T * B, ...]``."""
        return PolicyInputs(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).flatten(0, 1)
                               for f in fields(self)})


@dataclass
class PolicyOutput:
    """One step of the policy for N environments.

    Attributes:
        actions: ``[N, K]`` long, one value per head in spec order.
        log_prob: ``[N]`` log-probability of the actions, summed over the heads ``mask`` keeps.
        entropy: ``[N]`` entropy of each head's distribution, summed over the kept heads.
        value: ``[N]`` baseline estimate of the return.
        mask: ``[N, K]`` float, 1.0 for the heads that matter given the sampled flag.
    """

    actions: torch.Tensor
    log_prob: torch.Tensor
    entropy: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor


@dataclass
class UnrollOutput:
    """The policy's scores of ``[T, B]`` given actions (all ``[T, B]``)."""

    log_prob: torch.Tensor
    entropy: torch.Tensor
    value: torch.Tensor


class LocationHead(nn.Module):
    """Core vector -> ``[4, 4, core / 16]`` map -> transposed-conv decoder -> ``G * G`` logits."""

    def __init__(self, core_dim: int, grid_size: int, channels: int, num_blocks: int) -> None:
        super().__init__()
        cells = DECODER_INPUT_SIZE * DECODER_INPUT_SIZE
        if core_dim % cells:
            raise ValueError(f"policy.core_dim must be a multiple of {cells} to reshape into a "
                             f"{DECODER_INPUT_SIZE}x{DECODER_INPUT_SIZE} map, got {core_dim}")
        if grid_size % DECODER_INPUT_SIZE:
            raise ValueError(f"location grid size must be a multiple of {DECODER_INPUT_SIZE}, got {grid_size}")
        self.in_channels = core_dim // cells
        self.decoder = ConvDecoder(self.in_channels, grid_size // DECODER_INPUT_SIZE, channels, num_blocks,
                                   channels, out_channels=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Sonnet's BatchReshape([4, 4, -1]) is channels-last: keep that layout, then go NCHW.
        side = DECODER_INPUT_SIZE
        x = z.reshape(z.shape[0], side, side, self.in_channels).permute(0, 3, 1, 2)
        return self.decoder(x).flatten(1)


class SpiralPolicy(nn.Module):
    """SPIRAL's agent (see the module docstring).

    Args:
        spec: The action space; heads are sampled in its order.
        image_channels: C of canvases and targets.
        image_size: H = W of canvases (a power-of-two multiple of 8).
        noise_dim: Size of the per-episode noise sample.
        conditional: Whether the target image is an input.
        config: Layer sizes; ``config.blind`` drops the canvas input.
    """

    memory_format: torch.memory_format = torch.channels_last
    """Layout of conv weights and image inputs (channels-last is the faster one on CPU)."""

    def __init__(self, spec: ActionSpec, image_channels: int, image_size: int, noise_dim: int,
                 conditional: bool, config: PolicyConfig) -> None:
        super().__init__()
        if config.mlp_hidden[-1] != config.conv_channels:
            raise ValueError(f"policy.mlp_hidden must end with policy.conv_channels ({config.conv_channels}) so the "
                             f"conditioning vector can be added to the conv features, got {list(config.mlp_hidden)}")
        if image_size % ENCODED_SIZE:
            raise ValueError(f"image size must be a multiple of {ENCODED_SIZE}, got {image_size}")
        self.spec = spec
        self.image_channels = image_channels
        self.image_size = image_size
        self.noise_dim = noise_dim
        self.conditional = conditional
        self.blind = config.blind
        self.fp32_heads = config.fp32_heads
        self.core_dim = config.core_dim
        ch = config.conv_channels

        # -- torso -------------------------------------------------------------------------
        in_channels = 2 + (0 if self.blind else image_channels) + (image_channels if conditional else 0)
        self.register_buffer("grids", xy_grids(image_size, image_size), persistent=False)
        self.input_conv = nn.Conv2d(in_channels, ch, 5, padding=2)
        self.prev_action_embeds = nn.ModuleList(nn.Linear(self._encoding_width(k), config.action_embed_dim)
                                                for k in range(spec.num_heads))
        self.prev_action_mlp = MLP(spec.num_heads * config.action_embed_dim, config.mlp_hidden)
        self.noise_mlp = MLP(noise_dim, config.mlp_hidden)
        self.encoder = ConvEncoder(ch, image_size // ENCODED_SIZE, ch, config.encoder_res_blocks, ch)
        self.torso_out = nn.Linear(ch * ENCODED_SIZE * ENCODED_SIZE, config.core_dim)

        # -- core --------------------------------------------------------------------------
        self.core = nn.LSTM(config.core_dim, config.core_dim)

        # -- autoregressive heads ------------------------------------------------------------
        heads: list[nn.Module] = []
        for head in spec.heads:
            if head.spatial:
                heads.append(LocationHead(config.core_dim, head.grid_size, ch, config.decoder_res_blocks))
            else:
                heads.append(nn.Linear(config.core_dim, head.num_values))
        self.heads = nn.ModuleList(heads)
        # Optional spatial shortcut: encoder map -> one logit per grid cell, per location head.
        self.location_skips = nn.ModuleDict()
        if config.location_skip:
            for k, head in enumerate(spec.heads):
                if head.spatial:
                    # No bias: a constant added to every logit of a softmax changes nothing, so
                    # a bias could not learn (its gradient is zero, at times exactly 0.0).
                    skip = nn.Conv2d(ch, 1, 1, bias=False)
                    nn.init.zeros_(skip.weight)
                    self.location_skips[str(k)] = skip
        # Optional: the encoder's features at a chosen cell, for the heads after a location head.
        self.location_feature_projections = nn.ModuleDict()
        if config.location_features:
            for k, head in enumerate(spec.heads[:-1]):
                if head.spatial:
                    projection = nn.Linear(ch, config.core_dim)
                    nn.init.zeros_(projection.weight)
                    nn.init.zeros_(projection.bias)
                    self.location_feature_projections[str(k)] = projection
        # The last head's choice feeds nothing, so it has no embedding or residual MLP.
        self.action_embeds = nn.ModuleList(nn.Linear(self._encoding_width(k), config.action_embed_dim)
                                           for k in range(spec.num_heads - 1))
        self.residual_mlps = nn.ModuleList(MLP(config.core_dim + config.action_embed_dim,
                                               (*RESIDUAL_MLP_SIZES, config.core_dim))
                                           for _ in range(spec.num_heads - 1))
        self.value_head = nn.Linear(config.core_dim, 1)
        self.register_buffer("mask_table", torch.from_numpy(spec.mask_table()), persistent=False)
        # Channels-last convolutions are faster on CPU (oneDNN) for these few-channel images.
        self.to(memory_format=self.memory_format)

    # -- helpers ---------------------------------------------------------------------------

    def _encoding_width(self, k: int) -> int:
        head = self.spec.heads[k]
        return 2 if head.spatial else head.num_values

    def _encode_action(self, k: int, values: torch.Tensor) -> torch.Tensor:
        """Head ``k``'s values ``[N]`` as float features: (y, x) for locations, else one-hot."""
        head = self.spec.heads[k]
        if head.spatial:
            return location_coordinates(values, head.grid_size)
        return F.one_hot(values, head.num_values).float()

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> LSTMState:
        """Zero LSTM state ``(h, c)`` for ``batch_size`` new episodes."""
        if device is None:
            device = self.value_head.weight.device
        zeros = torch.zeros(batch_size, self.core_dim, device=device)
        return zeros, zeros.clone()

    def _check_inputs(self, inputs: PolicyInputs, leading: int) -> None:
        c, s = self.image_channels, self.image_size
        canvas = inputs.canvas
        if canvas.dim() != leading + 3 or tuple(canvas.shape[-3:]) != (c, s, s):
            raise ValueError(f"canvas must be [{'T, B' if leading == 2 else 'N'}, {c}, {s}, {s}], "
                             f"got {tuple(canvas.shape)}")
        if inputs.prev_action.shape[-1] != self.spec.num_heads:
            raise ValueError(f"prev_action must have {self.spec.num_heads} heads {list(self.spec.names)}, "
                             f"got shape {tuple(inputs.prev_action.shape)}")
        if inputs.noise.shape[-1] != self.noise_dim:
            raise ValueError(f"noise must have {self.noise_dim} dims, got shape {tuple(inputs.noise.shape)}")
        if self.conditional and inputs.target is None:
            raise ValueError("this policy is conditional: inputs.target (the image to reconstruct) is required")

    def _torso(self, inputs: PolicyInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, ...]`` inputs to ``[N, core_dim]`` features for the LSTM and the encoder's 8x8 map."""
        n = inputs.canvas.shape[0]
        spatial = [] if self.blind else [inputs.canvas]
        if self.conditional:
            assert inputs.target is not None
            spatial.append(inputs.target)
        spatial.append(self.grids.expand(n, -1, -1, -1))
        h = self.input_conv(torch.cat(spatial, dim=1).contiguous(memory_format=self.memory_format))

        mask = inputs.prev_mask
        embedded = [self.prev_action_embeds[k](self._encode_action(k, inputs.prev_action[:, k])) * mask[:, k:k + 1]
                    for k in range(self.spec.num_heads)]
        cond = self.prev_action_mlp(torch.cat(embedded, dim=1)) + self.noise_mlp(inputs.noise)
        # In place: the conv output is not needed for its backward, and avoiding two fresh
        # full-resolution allocations saves page faults (most of the acting time on small N).
        h = h.add_(cond[:, :, None, None]).relu_()
        h = self.encoder(h)
        return self.torso_out(h.flatten(1)), h

    def _skip_logits(self, k: int, encoded: torch.Tensor) -> torch.Tensor:
        """Location head ``k``'s shortcut logits ``[N, G * G]`` from the encoder's 8x8 map."""
        grid = self.spec.heads[k].grid_size
        logits = self.location_skips[str(k)](encoded)
        if grid > ENCODED_SIZE:
            logits = F.interpolate(logits, size=(grid, grid), mode="nearest")
        elif grid < ENCODED_SIZE:
            logits = F.adaptive_avg_pool2d(logits, grid)
        return logits.flatten(1)

    def _features_at(self, k: int, encoded: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The encoder's features ``[N, C]`` at the cells ``values`` of location head ``k``'s grid.

        The 8x8 map is resampled to the grid as :meth:`_skip_logits` does: averaged over blocks
        for a coarser grid, the nearest cell for a finer one.
        """
        grid = self.spec.heads[k].grid_size
        rows, cols = values // grid, values % grid
        if grid <= ENCODED_SIZE:
            feature_map = F.adaptive_avg_pool2d(encoded, grid) if grid < ENCODED_SIZE else encoded
        else:
            feature_map = encoded
            rows, cols = rows * ENCODED_SIZE // grid, cols * ENCODED_SIZE // grid
        return feature_map[torch.arange(values.shape[0], device=values.device), :, rows, cols]

    def _heads(self, z: torch.Tensor, encoded: torch.Tensor, actions: torch.Tensor | None,
               generator: torch.Generator | None, greedy: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the heads in order; sample each (``actions`` None) or take the given value.

        With ``greedy`` each head takes its most likely value (given the values chosen before
        it) instead of a sample. ``encoded`` is the torso's 8x8 map (read by location skips).

        Returns the per-head logits and the ``[N, K]`` actions.
        """
        if self.fp32_heads:  # policy.fp32_heads: leave bf16 autocast for the heads
            with torch.autocast(z.device.type, enabled=False):
                return self._heads_in_order(z.float(), encoded.float(), actions, generator, greedy)
        return self._heads_in_order(z, encoded, actions, generator, greedy)

    def _heads_in_order(self, z: torch.Tensor, encoded: torch.Tensor, actions: torch.Tensor | None,
                        generator: torch.Generator | None, greedy: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        """:meth:`_heads`' loop over the heads, in whatever precision is in force."""
        logits_list: list[torch.Tensor] = []
        chosen: list[torch.Tensor] = []
        last = self.spec.num_heads - 1
        for k, head in enumerate(self.heads):
            logits = head(z)
            if str(k) in self.location_skips:
                logits = logits + self._skip_logits(k, encoded)
            logits_list.append(logits)
            if actions is None and greedy:
                value = logits.argmax(dim=-1)
            elif actions is None:
                probs = torch.softmax(logits.float(), dim=-1)
                value = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                value = actions[:, k]
            chosen.append(value)
            if k < last:
                embedded = self.action_embeds[k](self._encode_action(k, value))
                z = F.relu(z + self.residual_mlps[k](torch.cat([z, embedded], dim=1)))
                if str(k) in self.location_feature_projections:
                    z = F.relu(z + self.location_feature_projections[str(k)](self._features_at(k, encoded, value)))
        return logits_list, torch.stack(chosen, dim=1)

    def _score(self, logits_list: list[torch.Tensor],
               actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked sums of log-probabilities and entropies, and the masks, for ``[N, K]`` actions."""
        log_probs, entropies = [], []
        for k, logits in enumerate(logits_list):
            log_p = torch.log_softmax(logits.float(), dim=-1)  # fp32 even under bf16 autocast
            log_probs.append(log_p.gather(1, actions[:, k:k + 1]).squeeze(1))
            entropies.append(-(log_p.exp() * log_p).sum(-1))
        mask = self.mask_table[actions[:, 0]]
        log_prob = (torch.stack(log_probs, dim=1) * mask).sum(1)
        entropy = (torch.stack(entropies, dim=1) * mask).sum(1)
        return log_prob, entropy, mask

    def _check_actions(self, actions: torch.Tensor, n: int) -> torch.Tensor:
        if actions.shape != (n, self.spec.num_heads):
            raise ValueError(f"actions must be [{n}, {self.spec.num_heads}] (heads {list(self.spec.names)}), "
                             f"got {tuple(actions.shape)}")
        actions = actions.long()
        sizes = torch.tensor(self.spec.sizes, device=actions.device)
        if bool(((actions < 0) | (actions >= sizes)).any()):
            raise ValueError(f"actions out of range for heads {dict(zip(self.spec.names, self.spec.sizes))}")
        return actions

    # -- public API ------------------------------------------------------------------------

    def head_logits(self, inputs: PolicyInputs, state: LSTMState,
                    actions: torch.Tensor) -> list[torch.Tensor]:
        """Per-head logits ``[N, num_values_k]`` when the heads are conditioned on ``actions``."""
        self._check_inputs(inputs, leading=1)
        actions = self._check_actions(actions, inputs.canvas.shape[0])
        features, encoded = self._torso(inputs)
        core, _ = self._core_step(features, state)
        logits, _ = self._heads(core, encoded, actions, None)
        return logits

    def _core_step(self, z: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        h, c = state
        out, (h2, c2) = self.core(z.unsqueeze(0), (h.unsqueeze(0), c.unsqueeze(0)))
        # The carried state stays fp32 under bf16 autocast, so rounding does not build up over an episode.
        return out[0], (h2[0].float(), c2[0].float())

    def forward(self, inputs: PolicyInputs, state: LSTMState, actions: torch.Tensor | None = None,
                generator: torch.Generator | None = None, greedy: bool = False) -> tuple[PolicyOutput, LSTMState]:
        """One step for N environments.

        Args:
            inputs: ``[N, ...]`` observations.
            state: LSTM state from :meth:`initial_state` or the previous step.
            actions: ``[N, K]`` actions to score (teacher forcing); None samples new ones.
            generator: Random source for sampling (makes acting reproducible).
            greedy: Take each head's most likely value instead of sampling (evaluation: the
                policy's single most likely program, head by head).

        Returns:
            The step's output and the next LSTM state.
        """
        self._check_inputs(inputs, leading=1)
        n = inputs.canvas.shape[0]
        if actions is not None:
            actions = self._check_actions(actions, n)
        features, encoded = self._torso(inputs)
        core, new_state = self._core_step(features, state)
        value = self.value_head(core).squeeze(-1).float()
        logits, chosen = self._heads(core, encoded, actions, generator, greedy=greedy)
        log_prob, entropy, mask = self._score(logits, chosen)
        return PolicyOutput(actions=chosen, log_prob=log_prob, entropy=entropy, value=value, mask=mask), new_state

    def unroll(self, inputs: PolicyInputs, actions: torch.Tensor, state: LSTMState) -> UnrollOutput:
        """Score ``[T, B, K]`` actions taken after ``[T, B, ...]`` observations, from ``state``.

        Equal to calling :meth:`forward` with the actions at each of the T steps; the torso and
        the heads run once over all T*B steps and only the LSTM is sequential.
        """
        self.check_unroll(inputs, actions)
        return self.unroll_unchecked(inputs, actions, state)

    def check_unroll(self, inputs: PolicyInputs, actions: torch.Tensor) -> None:
        """What :meth:`unroll` validates: input shapes, and actions ``[T, B, K]`` within each head's range.

        Raises:
            ValueError: Naming the input or head that is wrong.
        """
        self._check_inputs(inputs, leading=2)
        t, b = inputs.canvas.shape[:2]
        if actions.shape != (t, b, self.spec.num_heads):
            raise ValueError(f"actions must be [{t}, {b}, {self.spec.num_heads}], got {tuple(actions.shape)}")
        self._check_actions(actions.reshape(t * b, -1), t * b)

    def unroll_unchecked(self, inputs: PolicyInputs, actions: torch.Tensor, state: LSTMState) -> UnrollOutput:
        """:meth:`unroll` after :meth:`check_unroll`: no data-dependent branch, so ``torch.compile``
        compiles it into one graph (the learner calls :meth:`check_unroll` first, eagerly)."""
        t, b = inputs.canvas.shape[:2]
        flat_actions = actions.reshape(t * b, -1).long()
        features, encoded = self._torso(inputs.flatten_time())
        features = features.view(t, b, -1)
        h, c = state
        core, _ = self.core(features, (h.unsqueeze(0), c.unsqueeze(0)))
        core = core.reshape(t * b, -1)
        value = self.value_head(core).squeeze(-1).float()
        logits, _ = self._heads(core, encoded, flat_actions, None)
        log_prob, entropy, _ = self._score(logits, flat_actions)
        return UnrollOutput(log_prob=log_prob.view(t, b), entropy=entropy.view(t, b), value=value.view(t, b))


__all__ = ["LSTMState", "PolicyInputs", "PolicyOutput", "SpiralPolicy", "UnrollOutput"]
