//! Dense linear algebra for the closed-form baselines, in f64: products through candle's CPU
//! matrix multiply, and a Cholesky solver for the symmetric positive definite normal
//! equations (at most a few hundred unknowns, so an unblocked factorisation is plenty).

use candle_core::{Device, Tensor};

use super::error::ForecastError;

/// `a` `[rows, inner]` times `b` `[inner, cols]`, row-major.
pub fn matmul(
    a: &[f64],
    rows: usize,
    inner: usize,
    b: &[f64],
    cols: usize,
) -> Result<Vec<f64>, ForecastError> {
    let a = Tensor::from_slice(a, (rows, inner), &Device::Cpu)?;
    let b = Tensor::from_slice(b, (inner, cols), &Device::Cpu)?;
    Ok(a.matmul(&b)?.flatten_all()?.to_vec1::<f64>()?)
}

/// Adds `xᵀx` to `gram` `[cols, cols]` and `xᵀy` to `cross` `[cols, targets]` for the block
/// `x` `[rows, cols]`, `y` `[rows, targets]`.
pub fn accumulate_normal_equations(
    x: &[f64],
    y: &[f64],
    rows: usize,
    cols: usize,
    targets: usize,
    gram: &mut [f64],
    cross: &mut [f64],
) -> Result<(), ForecastError> {
    let x = Tensor::from_slice(x, (rows, cols), &Device::Cpu)?;
    let y = Tensor::from_slice(y, (rows, targets), &Device::Cpu)?;
    let x_transposed = x.t()?.contiguous()?;
    let block_gram = x_transposed.matmul(&x)?.flatten_all()?.to_vec1::<f64>()?;
    let block_cross = x_transposed.matmul(&y)?.flatten_all()?.to_vec1::<f64>()?;
    for (total, part) in gram.iter_mut().zip(block_gram) {
        *total += part;
    }
    for (total, part) in cross.iter_mut().zip(block_cross) {
        *total += part;
    }
    Ok(())
}

/// Solves `a · w = b` for symmetric positive definite `a` `[n, n]` and `b` `[n, m]` by
/// Cholesky factorisation `a = l·lᵀ`; fails when `a` is not numerically positive definite.
pub fn cholesky_solve(a: &[f64], n: usize, b: &[f64], m: usize) -> Result<Vec<f64>, ForecastError> {
    let mut l = vec![0.0_f64; n * n];
    for row in 0..n {
        for col in 0..=row {
            let dot: f64 = (0..col).map(|k| l[row * n + k] * l[col * n + k]).sum();
            let value = a[row * n + col] - dot;
            if row == col {
                if value <= 0.0 || !value.is_finite() {
                    return Err(ForecastError::Numerical(format!(
                        "the normal equations are not positive definite (pivot {row} is {value})"
                    )));
                }
                l[row * n + col] = value.sqrt();
            } else {
                l[row * n + col] = value / l[col * n + col];
            }
        }
    }
    // Forward substitution l·z = b, then back substitution lᵀ·w = z, all right-hand sides at
    // once (row-major, so the inner loops run over contiguous right-hand-side rows).
    let mut w = b.to_vec();
    for row in 0..n {
        for k in 0..row {
            let factor = l[row * n + k];
            for rhs in 0..m {
                w[row * m + rhs] -= factor * w[k * m + rhs];
            }
        }
        let pivot = l[row * n + row];
        for rhs in 0..m {
            w[row * m + rhs] /= pivot;
        }
    }
    for row in (0..n).rev() {
        for k in row + 1..n {
            let factor = l[k * n + row];
            for rhs in 0..m {
                w[row * m + rhs] -= factor * w[k * m + rhs];
            }
        }
        let pivot = l[row * n + row];
        for rhs in 0..m {
            w[row * m + rhs] /= pivot;
        }
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_small_system_exactly() {
        // a = [[4, 2], [2, 3]], w = [[1, 2], [-1, 0.5]] → b = a·w.
        let a = [4.0, 2.0, 2.0, 3.0];
        let b = [
            4.0 * 1.0 + -2.0,
            4.0 * 2.0 + 2.0 * 0.5,
            2.0 * 1.0 + -3.0,
            2.0 * 2.0 + 3.0 * 0.5,
        ];
        let w = cholesky_solve(&a, 2, &b, 2).unwrap();
        for (found, expected) in w.iter().zip([1.0, 2.0, -1.0, 0.5]) {
            assert!((found - expected).abs() < 1e-12, "{w:?}");
        }
    }

    #[test]
    fn cholesky_rejects_an_indefinite_matrix() {
        let a = [1.0, 2.0, 2.0, 1.0];
        assert!(matches!(
            cholesky_solve(&a, 2, &[1.0, 1.0], 1),
            Err(ForecastError::Numerical(_))
        ));
    }

    #[test]
    fn normal_equations_accumulate_across_blocks() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let y = [1.0, 0.0, 2.0];
        let (mut gram, mut cross) = (vec![0.0; 4], vec![0.0; 2]);
        accumulate_normal_equations(&x[..4], &y[..2], 2, 2, 1, &mut gram, &mut cross).unwrap();
        accumulate_normal_equations(&x[4..], &y[2..], 1, 2, 1, &mut gram, &mut cross).unwrap();
        assert_eq!(
            gram,
            vec![
                1.0 + 9.0 + 25.0,
                2.0 + 12.0 + 30.0,
                2.0 + 12.0 + 30.0,
                4.0 + 16.0 + 36.0
            ]
        );
        assert_eq!(cross, vec![1.0 + 10.0, 2.0 + 12.0]);
    }
}
