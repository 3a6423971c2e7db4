//! The exact bytes each vocabulary piece stands for: GPT-2's byte-level alphabet (`Ġworld`),
//! SentencePiece's visible space (`▁world`) and its byte tokens (`<0x0A>`).

use std::collections::HashMap;

/// SentencePiece's visible space.
pub(super) const SPM_SPACE: char = '\u{2581}';

/// GPT-2's reversible byte → printable-character table.
pub(super) fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\0');
            n += 1;
            c
        };
    }
    table
}

pub(super) fn char_to_byte() -> HashMap<char, u8> {
    byte_to_char()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect()
}

/// Bytes of a byte-level BPE piece (`Ġworld` → ` world`).
pub(super) fn byte_level_bytes(piece: &str, table: &HashMap<char, u8>) -> Box<[u8]> {
    let mut out = Vec::with_capacity(piece.len());
    for c in piece.chars() {
        match table.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.into_boxed_slice()
}

/// `<0xAB>` → `0xAB`.
pub(super) fn parse_byte_token(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Bytes of a SentencePiece piece (`▁world` → ` world`, `<0x0A>` → `\n`).
pub(super) fn spm_bytes(piece: &str, is_byte_token: bool) -> Box<[u8]> {
    if is_byte_token && let Some(b) = parse_byte_token(piece) {
        return Box::new([b]);
    }
    piece
        .replace(SPM_SPACE, " ")
        .into_bytes()
        .into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let table = byte_to_char();
        let inverse = char_to_byte();
        assert_eq!(inverse.len(), 256);
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        for b in 0..=255u8 {
            assert_eq!(inverse[&table[b as usize]], b);
        }
    }

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0xFF>"), Some(255));
        assert_eq!(parse_byte_token("<0x0>"), None);
        assert_eq!(parse_byte_token("<unk>"), None);
        assert_eq!(&*spm_bytes("▁hello▁you", false), b" hello you");
    }
}
