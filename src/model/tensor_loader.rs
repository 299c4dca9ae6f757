//! Reads GGUF tensors straight into their final storage.
//!
//! candle's `Content::tensor` reads each tensor into a byte buffer and then copies it into a
//! typed block vector, so loading briefly holds the largest tensor twice. Gemma 3's 262,144 ×
//! 640 embedding matrix is 178 MB, which made that copy the peak of the whole load. Reading
//! into the final vector avoids it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::TensorInfo;
use candle_core::quantized::k_quants::GgmlType;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use crate::kernels::qmatmul::{Blocks, QWeight};

/// Reads a 2-D weight matrix. candle's GGUF reader already lists the dimensions outermost
/// first, so the shape is `(rows, cols)`.
pub fn read_weight(file: &mut File, data_offset: u64, info: &TensorInfo) -> candle_core::Result<QWeight> {
    let (rows, cols) = match info.shape.dims() {
        [rows, cols] => (*rows, *cols),
        dims => candle_core::bail!("expected a 2-D weight, found shape {dims:?}"),
    };
    let block_size = info.ggml_dtype.block_size();
    if cols % block_size != 0 {
        candle_core::bail!("rows of {cols} values do not fill whole blocks of {block_size}");
    }
    let count = rows * cols / block_size;
    file.seek(SeekFrom::Start(data_offset + info.offset))?;

    let blocks = match info.ggml_dtype {
        GgmlDType::Q4_0 => Blocks::Q4_0(read_blocks(file, count)?),
        GgmlDType::Q4_1 => Blocks::Q4_1(read_blocks(file, count)?),
        GgmlDType::Q5_0 => Blocks::Q5_0(read_blocks(file, count)?),
        GgmlDType::Q5_1 => Blocks::Q5_1(read_blocks(file, count)?),
        GgmlDType::Q8_0 => Blocks::Q8_0(read_blocks(file, count)?),
        GgmlDType::Q2K => Blocks::Q2K(read_blocks(file, count)?),
        GgmlDType::Q3K => Blocks::Q3K(read_blocks(file, count)?),
        GgmlDType::Q4K => Blocks::Q4K(read_blocks(file, count)?),
        GgmlDType::Q5K => Blocks::Q5K(read_blocks(file, count)?),
        GgmlDType::Q6K => Blocks::Q6K(read_blocks(file, count)?),
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
            let values = read_dense(file, info.ggml_dtype, rows * cols)?;
            Blocks::Dense(Tensor::from_vec(values, (rows, cols), &Device::Cpu)?)
        }
        other => candle_core::bail!("unsupported weight type {other:?}"),
    };
    Ok(QWeight::new(blocks, rows, cols))
}

/// Reads a small tensor (norm weight or bias) as a dense f32 tensor of its GGUF shape.
pub fn read_dense_tensor(file: &mut File, data_offset: u64, info: &TensorInfo) -> candle_core::Result<Tensor> {
    file.seek(SeekFrom::Start(data_offset + info.offset))?;
    let dims = info.shape.dims().to_vec();
    let values = read_dense(file, info.ggml_dtype, info.shape.elem_count())?;
    Tensor::from_vec(values, dims, &Device::Cpu)
}

fn read_dense(file: &mut File, dtype: GgmlDType, count: usize) -> candle_core::Result<Vec<f32>> {
    Ok(match dtype {
        GgmlDType::F32 => read_blocks::<f32>(file, count)?,
        GgmlDType::F16 => read_blocks::<half::f16>(file, count)?
            .into_iter()
            .map(half::f16::to_f32)
            .collect(),
        GgmlDType::BF16 => read_blocks::<half::bf16>(file, count)?
            .into_iter()
            .map(half::bf16::to_f32)
            .collect(),
        other => candle_core::bail!("expected an f32, f16 or bf16 tensor, found {other:?}"),
    })
}

fn read_blocks<T: GgmlType>(file: &mut File, count: usize) -> candle_core::Result<Vec<T>> {
    if std::mem::size_of::<T>() != T::DTYPE.type_size() {
        candle_core::bail!("block layout of {:?} differs from the GGUF layout", T::DTYPE);
    }
    let mut blocks = vec![T::zeros(); count];
    // SAFETY: GGML block types are `repr(C)` structs of integers and half floats with no
    // padding, which the size check above confirms against the GGUF type size. So every byte
    // pattern is a valid value, and the initialised vector may be viewed and filled as bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast::<u8>(), count * std::mem::size_of::<T>())
    };
    file.read_exact(bytes)?;
    Ok(blocks)
}
