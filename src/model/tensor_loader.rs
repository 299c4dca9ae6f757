//! Reads GGUF tensors straight into candle's block storage.
//!
//! candle's `Content::tensor` reads each tensor into a byte buffer and then copies it into a
//! typed block vector, so loading briefly holds the largest tensor twice. Gemma 3's 262,144 ×
//! 640 embedding matrix is 178 MB, which made that copy the peak of the whole load. Reading
//! into the final vector avoids it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::TensorInfo;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1,
};
use candle_core::quantized::{GgmlDType, GgmlType, QStorage, QTensor, QuantizedType};

pub fn read_tensor(file: &mut File, data_offset: u64, info: &TensorInfo) -> candle_core::Result<QTensor> {
    let elements = info.shape.elem_count();
    let block_size = info.ggml_dtype.block_size();
    if elements % block_size != 0 {
        candle_core::bail!("{elements} elements do not fill whole blocks of {block_size}");
    }
    let blocks = elements / block_size;
    file.seek(SeekFrom::Start(data_offset + info.offset))?;

    let storage: Box<dyn QuantizedType> = match info.ggml_dtype {
        GgmlDType::F32 => read_blocks::<f32>(file, blocks)?,
        GgmlDType::F16 => read_blocks::<half::f16>(file, blocks)?,
        GgmlDType::BF16 => read_blocks::<half::bf16>(file, blocks)?,
        GgmlDType::Q4_0 => read_blocks::<BlockQ4_0>(file, blocks)?,
        GgmlDType::Q4_1 => read_blocks::<BlockQ4_1>(file, blocks)?,
        GgmlDType::Q5_0 => read_blocks::<BlockQ5_0>(file, blocks)?,
        GgmlDType::Q5_1 => read_blocks::<BlockQ5_1>(file, blocks)?,
        GgmlDType::Q8_0 => read_blocks::<BlockQ8_0>(file, blocks)?,
        GgmlDType::Q8_1 => read_blocks::<BlockQ8_1>(file, blocks)?,
        GgmlDType::Q2K => read_blocks::<BlockQ2K>(file, blocks)?,
        GgmlDType::Q3K => read_blocks::<BlockQ3K>(file, blocks)?,
        GgmlDType::Q4K => read_blocks::<BlockQ4K>(file, blocks)?,
        GgmlDType::Q5K => read_blocks::<BlockQ5K>(file, blocks)?,
        GgmlDType::Q6K => read_blocks::<BlockQ6K>(file, blocks)?,
        GgmlDType::Q8K => read_blocks::<BlockQ8K>(file, blocks)?,
    };
    QTensor::new(QStorage::Cpu(storage), info.shape.clone())
}

fn read_blocks<T: GgmlType + 'static>(file: &mut File, count: usize) -> candle_core::Result<Box<dyn QuantizedType>>
where
    Vec<T>: QuantizedType,
{
    if std::mem::size_of::<T>() != T::DTYPE.type_size() {
        candle_core::bail!("block layout of {:?} differs from the GGUF layout", T::DTYPE);
    }
    let mut blocks = vec![T::zeros(); count];
    // SAFETY: GGML block types are `repr(C)` structs of integers and half floats with no
    // padding (checked above against the GGUF type size), so every byte pattern is a valid
    // value and the initialised vector may be viewed and filled as bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast::<u8>(), count * std::mem::size_of::<T>())
    };
    file.read_exact(bytes)?;
    Ok(Box::new(blocks))
}
