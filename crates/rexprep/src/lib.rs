//! Frame → Rex-Omni `pixel_values` [N, 1176] and `grid_thw` (../shared/reference/rex-omni-spec.md §1).
