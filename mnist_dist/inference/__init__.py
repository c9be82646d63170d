"""Using a trained model: real images made MNIST-like (preprocess), recognised (recognize), exported
(export), served over HTTP (serve), printed (results), and their commands (commands)."""
