"""The agent: acting, unrolls, rewards, what the discriminator judges, training state."""
