//! Reading a checkpoint's tensors: safetensors files (one, or sharded through
//! `model.safetensors.index.json`), memory-mapped; bf16/f16/f32 converted to f32 and FP8 (e4m3)
//! weights dequantized with their `weight_scale_inv` block scales as they are read. The matrices of
//! linear layers stay bf16 when the checkpoint stores them so ([`WeightMatrix`]).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::RmsNorm;
use indicatif::{ProgressBar, ProgressStyle};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

use crate::error::{ModelError, Result};
use crate::linear::{Linear, WeightMatrix};

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// All tensors of a checkpoint folder, located but not yet read.
pub struct Weights {
    files: Vec<Mmap>,
    entries: HashMap<String, Entry>,
    fp8_block_size: [usize; 2],
    progress: ProgressBar,
}

impl Weights {
    /// Maps every safetensors file of `dir`. `fp8_block_size` comes from `quantization_config`.
    pub fn open(dir: &Path, fp8_block_size: Option<[usize; 2]>) -> Result<Self> {
        let paths = safetensors_files(dir)?;
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        let mut total_bytes = 0u64;
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
            // Safety: the checkpoint is not modified while mapped; all reads are bounds-checked.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            let (header_len, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| ModelError::io(path, format!("invalid safetensors file: {e}")))?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (start, end) = (data_start + info.data_offsets.0, data_start + info.data_offsets.1);
                if end > mmap.len() {
                    return Err(ModelError::io(
                        path,
                        format!("tensor `{name}` runs past the end of the file (truncated?)"),
                    ));
                }
                total_bytes += (end - start) as u64;
                entries.insert(name, Entry { file: i, dtype: info.dtype, shape: info.shape.clone(), start, end });
            }
            files.push(mmap);
        }
        let progress = ProgressBar::new(total_bytes).with_style(
            ProgressStyle::with_template("loading weights {bar:40} {binary_bytes}/{binary_total_bytes} {elapsed}")
                .expect("static template"),
        );
        Ok(Weights { files, entries, fp8_block_size: fp8_block_size.unwrap_or([128, 128]), progress })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Reads `name` as an f32 tensor, checking its shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.get_f32(name, shape)?, shape, &Device::Cpu)?)
    }

    /// Reads `name` as f32 values in row-major order, checking its shape.
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (entry, bytes) = self.entry(name, shape)?;
        let values = match entry.dtype {
            Dtype::F32 => convert(bytes, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Dtype::BF16 => convert(bytes, 2, |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            Dtype::F16 => convert(bytes, 2, |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            Dtype::F8_E4M3 => self.dequantize_fp8(name, bytes, shape)?,
            other => {
                return Err(ModelError::BadTensor {
                    name: name.into(),
                    message: format!("dtype {other:?} is not supported"),
                })
            }
        };
        self.progress.inc(bytes.len() as u64);
        Ok(values)
    }

    /// Reads the `[rows, cols]` matrices `names` stacked by rows: in bf16 when all of them are stored
    /// in bf16 (exact, half the bytes), otherwise in f32.
    pub fn get_matrix(&self, names: &[String], rows: usize, cols: usize) -> Result<WeightMatrix> {
        if !names.iter().all(|n| self.entries.get(n).is_some_and(|e| e.dtype == Dtype::BF16)) {
            let mut values = Vec::with_capacity(names.len() * rows * cols);
            for name in names {
                values.extend(self.get_f32(name, &[rows, cols])?);
            }
            return Ok(WeightMatrix::F32(values));
        }
        let mut values = Vec::with_capacity(names.len() * rows * cols);
        for name in names {
            let (_, bytes) = self.entry(name, &[rows, cols])?;
            values.extend(bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]])));
            self.progress.inc(bytes.len() as u64);
        }
        Ok(WeightMatrix::Bf16(values))
    }

    /// The entry of `name` and its bytes, after checking its shape.
    fn entry(&self, name: &str, shape: &[usize]) -> Result<(&Entry, &[u8])> {
        let entry = self.entries.get(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        if entry.shape != shape {
            return Err(ModelError::Shape { name: name.into(), expected: shape.to_vec(), got: entry.shape.clone() });
        }
        Ok((entry, &self.files[entry.file][entry.start..entry.end]))
    }

    /// Reads `name` if the checkpoint has it.
    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A bias-free linear layer `{prefix}.weight` of shape `[out, in]`.
    pub fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
        Ok(Linear::new(self.get_matrix(&[format!("{prefix}.weight")], out, inp)?, out, inp))
    }

    /// An RMSNorm `{prefix}.weight` of width `dim`.
    pub fn rms_norm(&self, prefix: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm::new(self.get(&format!("{prefix}.weight"), &[dim])?, eps))
    }

    pub fn finish_progress(&self) {
        self.progress.finish_and_clear();
    }

    /// `W[i, j] = fp8(W8[i, j]) · scale_inv[i / rows, j / cols]` (the scale multiplies despite its name).
    fn dequantize_fp8(&self, name: &str, bytes: &[u8], shape: &[usize]) -> Result<Vec<f32>> {
        let [rows, cols] = match shape {
            [r, c] => [*r, *c],
            _ => return Err(ModelError::BadTensor { name: name.into(), message: "an FP8 tensor must be 2-D".into() }),
        };
        let [br, bc] = self.fp8_block_size;
        let scale_name = format!("{name}_scale_inv");
        let scales = self.get(&scale_name, &[rows.div_ceil(br), cols.div_ceil(bc)])?;
        let scales = scales.flatten_all()?.to_vec1::<f32>()?;
        let grid_cols = cols.div_ceil(bc);
        let lut = fp8_e4m3_table();
        let mut out = vec![0f32; rows * cols];
        out.par_chunks_mut(cols).zip(bytes.par_chunks(cols)).enumerate().for_each(|(i, (dst, src))| {
            let scale_row = &scales[(i / br) * grid_cols..(i / br + 1) * grid_cols];
            for (j, (d, s)) in dst.iter_mut().zip(src).enumerate() {
                *d = lut[*s as usize] * scale_row[j / bc];
            }
        });
        Ok(out)
    }
}

fn convert(bytes: &[u8], width: usize, f: impl Fn(&[u8]) -> f32 + Sync + Send) -> Vec<f32> {
    bytes.par_chunks_exact(width).map(f).collect()
}

/// The 256 values of float8 e4m3fn (no infinities; 0x7f and 0xff are NaN).
fn fp8_e4m3_table() -> [f32; 256] {
    std::array::from_fn(|b| {
        let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
        let exp = ((b >> 3) & 0xf) as i32;
        let man = (b & 0x7) as f32;
        let magnitude = match (exp, b & 0x7f) {
            (_, 0x7f) => f32::NAN,
            (0, _) => man / 8.0 * 2f32.powi(-6),
            _ => (1.0 + man / 8.0) * 2f32.powi(exp - 7),
        };
        sign * magnitude
    })
}

/// The checkpoint's safetensors files: from the shard index if there is one, else every
/// `*.safetensors` file in the folder.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::io(&index, e))?;
        let map = json["weight_map"].as_object().ok_or_else(|| ModelError::io(&index, "no `weight_map` object"))?;
        let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.exists()) {
            return Err(ModelError::io(missing, "listed in model.safetensors.index.json but not found"));
        }
        return Ok(paths);
    }
    let read = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut paths: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(ModelError::io(dir, "no *.safetensors weights found"));
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_table_matches_known_values() {
        let t = fp8_e4m3_table();
        assert_eq!(t[0x00], 0.0);
        assert_eq!(t[0x38], 1.0); // exponent 7, mantissa 0
        assert_eq!(t[0x7e], 448.0); // the largest finite value
        assert_eq!(t[0xfe], -448.0);
        assert_eq!(t[0x01], 2f32.powi(-9)); // smallest subnormal
        assert!(t[0x7f].is_nan() && t[0xff].is_nan());
    }

    fn write_checkpoint(dir: &Path, tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>) {
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    }

    #[test]
    fn fp8_blocks_scale_their_own_rows_and_columns() {
        let dir = std::env::temp_dir().join(format!("mlaserve-fp8-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // 3x5 weight of ones (0x38), blocks of 2x3: a 2x2 scale grid with partial edges.
        let scales: Vec<u8> = [1f32, 2., 3., 4.].iter().flat_map(|s| s.to_le_bytes()).collect();
        write_checkpoint(
            &dir,
            vec![
                ("w.weight", Dtype::F8_E4M3, vec![3, 5], vec![0x38; 15]),
                ("w.weight_scale_inv", Dtype::F32, vec![2, 2], scales),
            ],
        );
        let w = Weights::open(&dir, Some([2, 3])).unwrap();
        let got = w.get("w.weight", &[3, 5]).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, vec![vec![1., 1., 1., 2., 2.], vec![1., 1., 1., 2., 2.], vec![3., 3., 3., 4., 4.]]);
        let err = w.get("w.weight", &[5, 3]).unwrap_err().to_string();
        assert!(err.contains("w.weight") && err.contains("[3, 5]"), "{err}");
        assert!(w.get("nope", &[1]).unwrap_err().to_string().contains("`nope`"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
