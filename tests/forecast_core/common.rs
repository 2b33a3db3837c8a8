use xlstm_forecast::data::ChannelMatrix;

/// A fully observed `[time, channel]` matrix with `value(row, channel)` in every cell.
pub fn matrix(rows: usize, channels: usize, value: impl Fn(usize, usize) -> f64) -> ChannelMatrix {
    let mut values = Vec::with_capacity(rows * channels);
    for row in 0..rows {
        for channel in 0..channels {
            values.push(value(row, channel) as f32);
        }
    }
    ChannelMatrix {
        steps: rows,
        channels,
        values,
        missing: vec![false; rows * channels],
        calendar: None,
    }
}
