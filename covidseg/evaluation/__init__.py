"""Per-case 3D metrics, the cross-validation table and its report."""
