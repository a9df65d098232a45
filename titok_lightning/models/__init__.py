"""Plain ``nn.Module`` model families. Importing this package registers every named variant."""
