//! Splits a CSV stream into chunks of whole records, so that polars parses a bounded number
//! of rows at a time and the file is never held in memory at once.
//!
//! The splitter understands quoting (separators and line breaks inside `"..."` belong to the
//! field), remembers the file line on which every record starts so that errors can name it,
//! checks each record's field count, and drops blank lines.

use std::io::BufRead;

use super::error::DataError;

pub const SEPARATOR: u8 = b',';
pub const QUOTE: u8 = b'"';

/// Whole records, each ending in `\n`, without the header.
#[derive(Debug)]
pub struct RecordChunk {
    pub bytes: Vec<u8>,
    /// File line (1-based; the header is line 1) on which each record starts.
    pub record_lines: Vec<u64>,
}

pub struct CsvRecordReader<R> {
    reader: R,
    /// Physical lines consumed so far.
    lines_read: u64,
    at_start: bool,
}

/// The header record: column names (unquoted, trimmed) and the line it was on.
pub struct CsvHeader {
    pub names: Vec<String>,
    pub line: u64,
}

impl<R: BufRead> CsvRecordReader<R> {
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            lines_read: 0,
            at_start: true,
        }
    }

    /// The first non-blank record; `None` for an empty (or all-blank) input.
    pub fn read_header(&mut self) -> Result<Option<CsvHeader>, DataError> {
        let mut bytes = Vec::new();
        let Some(line) = self.read_record(&mut bytes)? else {
            return Ok(None);
        };
        let names =
            split_record(&bytes).map_err(|message| DataError::invalid_at(line, None, message))?;
        Ok(Some(CsvHeader { names, line }))
    }

    /// Up to `max_records` further records, each checked to have `field_count` fields;
    /// `None` at the end of the input.
    pub fn next_chunk(
        &mut self,
        max_records: usize,
        field_count: usize,
    ) -> Result<Option<RecordChunk>, DataError> {
        let mut chunk = RecordChunk {
            bytes: Vec::new(),
            record_lines: Vec::with_capacity(max_records),
        };
        while chunk.record_lines.len() < max_records {
            let record_start = chunk.bytes.len();
            let Some(line) = self.read_record(&mut chunk.bytes)? else {
                break;
            };
            let found = count_fields(&chunk.bytes[record_start..]);
            if found != field_count {
                return Err(DataError::invalid_at(
                    line,
                    None,
                    format!("expected {field_count} fields like the header, found {found}"),
                ));
            }
            if chunk.bytes.last() != Some(&b'\n') {
                chunk.bytes.push(b'\n');
            }
            chunk.record_lines.push(line);
        }
        Ok((!chunk.record_lines.is_empty()).then_some(chunk))
    }

    /// Appends the next non-blank record (possibly spanning several physical lines) to `out`
    /// and returns the line it starts on; blank lines are consumed and not appended.
    fn read_record(&mut self, out: &mut Vec<u8>) -> Result<Option<u64>, DataError> {
        loop {
            let record_start = out.len();
            let first_line = self.lines_read + 1;
            let mut in_quotes = false;
            loop {
                let line_start = out.len();
                let read = self.reader.read_until(b'\n', out)?;
                if read == 0 {
                    if in_quotes {
                        return Err(DataError::invalid_at(
                            first_line,
                            None,
                            "quoted field is not closed before the end of the file".to_string(),
                        ));
                    }
                    break;
                }
                self.lines_read += 1;
                if self.at_start {
                    self.at_start = false;
                    if out[line_start..].starts_with(b"\xEF\xBB\xBF") {
                        out.drain(line_start..line_start + 3);
                    }
                }
                let quotes = out[line_start..].iter().filter(|b| **b == QUOTE).count();
                in_quotes ^= quotes % 2 == 1;
                if !in_quotes {
                    break;
                }
            }
            if out.len() == record_start {
                return Ok(None);
            }
            if out[record_start..].iter().all(u8::is_ascii_whitespace) {
                out.truncate(record_start);
                continue;
            }
            return Ok(Some(first_line));
        }
    }
}

/// Number of fields in one record (separators outside quotes, plus one).
fn count_fields(record: &[u8]) -> usize {
    let mut in_quotes = false;
    let mut fields = 1;
    for byte in record {
        match *byte {
            QUOTE => in_quotes = !in_quotes,
            SEPARATOR if !in_quotes => fields += 1,
            _ => {}
        }
    }
    fields
}

/// Splits one record into unquoted, trimmed fields (`""` inside quotes is a literal quote).
fn split_record(record: &[u8]) -> Result<Vec<String>, String> {
    let text =
        std::str::from_utf8(record).map_err(|_| "the header is not valid UTF-8".to_string())?;
    let text = text.trim_end_matches(['\n', '\r']);
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if in_quotes && chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            '"' => in_quotes = !in_quotes,
            ',' if !in_quotes => fields.push(std::mem::take(&mut field).trim().to_string()),
            other => field.push(other),
        }
    }
    fields.push(field.trim().to_string());
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(text: &str) -> CsvRecordReader<&[u8]> {
        CsvRecordReader::new(text.as_bytes())
    }

    #[test]
    fn header_is_unquoted_trimmed_and_bom_free() {
        let mut records = reader("\u{FEFF}ts, \"a,b\" ,\"say \"\"hi\"\"\"\r\n1,2,3\n");
        let header = records.read_header().unwrap().unwrap();
        assert_eq!(header.names, vec!["ts", "a,b", "say \"hi\""]);
        assert_eq!(header.line, 1);
    }

    #[test]
    fn chunks_hold_whole_records_and_their_start_lines() {
        let mut records = reader("ts,v\n\n1,\"multi\nline\"\n2,3\n\n3,4");
        records.read_header().unwrap().unwrap();
        let first = records.next_chunk(2, 2).unwrap().unwrap();
        assert_eq!(first.record_lines, vec![3, 5]);
        assert_eq!(first.bytes, b"1,\"multi\nline\"\n2,3\n");
        let second = records.next_chunk(2, 2).unwrap().unwrap();
        assert_eq!(second.record_lines, vec![7]);
        assert_eq!(second.bytes, b"3,4\n");
        assert!(records.next_chunk(2, 2).unwrap().is_none());
    }

    #[test]
    fn wrong_field_count_names_the_line() {
        let mut records = reader("ts,a,b\n1,2,3\n2,3\n");
        records.read_header().unwrap();
        let err = records.next_chunk(10, 3).unwrap_err().to_string();
        assert!(
            err.contains("line 3") && err.contains("expected 3 fields"),
            "{err}"
        );
    }

    #[test]
    fn unclosed_quote_names_the_line_it_opened_on() {
        let mut records = reader("ts,a\n1,2\n2,\"oops\n3,4\n");
        records.read_header().unwrap();
        let err = records.next_chunk(10, 2).unwrap_err().to_string();
        assert!(
            err.contains("line 3") && err.contains("not closed"),
            "{err}"
        );
    }

    #[test]
    fn empty_and_blank_inputs_have_no_header() {
        assert!(reader("").read_header().unwrap().is_none());
        assert!(reader("\n \r\n").read_header().unwrap().is_none());
    }
}
